"""torchrun's agent, tied to the launcher that started it: `python -m recsys_moe.distributed.agent
[torchrun arguments]` is `torchrun` that ends (with SIGTERM, which it forwards to its ranks) when
the `recsys-moe train` process that started it dies, even by SIGKILL. Its ranks are tied to it in
turn (`recsys_moe.distributed.train`), so a killed launcher stops its node's whole share of the run.
"""

from __future__ import annotations

from recsys_moe.signals import die_with_parent


def main() -> None:
    die_with_parent()
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    main()
