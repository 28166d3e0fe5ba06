"""``python -m sentcomp.lmeval <lm_eval's arguments>``: lm-eval's command line with the ``sentcomp`` backend
registered (lm-eval 0.4.13 finds models only among the modules it imports itself).

Several processes (hosts, or local processes): set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` (or run on a Cloud TPU VM slice with ``SENTCOMP_LMEVAL_AUTO_DISTRIBUTED=1``); every process
runs the same command and process 0 writes the results (docs/lmeval.md).
"""

import os

from sentcomp import parallel


def main() -> None:
    parallel.initialize_distributed(auto=os.environ.get("SENTCOMP_LMEVAL_AUTO_DISTRIBUTED") == "1")
    from lm_eval.__main__ import cli_evaluate

    import sentcomp.lmeval  # noqa: F401  (registers the "sentcomp" model)

    cli_evaluate()


if __name__ == "__main__":
    main()
