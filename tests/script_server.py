"""A fork server for the tests: run as `python tests/script_server.py`, it imports the scripts' modules once,
then for each job on stdin (a JSON line: script, args, cwd, repo, stdout, stderr) forks a child that runs the
script as __main__ with its own argv, working directory, stdout and stderr, exactly like `python script args`
minus the start-up (torch, scikit-learn and torch's compiler cost about 4 s of CPU per process; a refusal
takes milliseconds). The child points paths.DATA_ROOT and MEMSCORE_ROOT at the job's repo, as that repo's own
paths.py would. Each job is answered with the child's exit status, a JSON line.

helpers.run_forked starts it; tests/test_errors.py::test_fork_server_matches_a_real_run checks the claim
against real runs.
"""

import json
import os
import runpy
import sys
import traceback


def serve():
    import matplotlib

    matplotlib.use("Agg")  # what reporting.report.pyplot() does first: the figures' backend, without a display
    import matplotlib.pyplot  # noqa: F401
    import torch._dynamo  # noqa: F401  (what the first optimizer a run makes loads)

    import mia_modi  # noqa: F401  (the shared start-up cost, paid once)
    import paths
    import pretrain_modi  # noqa: F401
    import prune_modi  # noqa: F401
    import summarize  # noqa: F401

    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(job["cwd"])
                paths.DATA_ROOT = os.path.join(job["repo"], "data", "datasets")
                paths.MEMSCORE_ROOT = os.path.join(job["repo"], "memscore")
                for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.argv = [job["script"], *job["args"]]
                runpy.run_path(job["script"], run_name="__main__")
                code = 0
            except SystemExit as exit_:  # as the interpreter ends: None is 0, a message is printed and 1
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
                if exit_.code is not None and not isinstance(exit_.code, int):
                    print(exit_.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])), flush=True)


if __name__ == "__main__":
    serve()
