"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of the finger and
policy parsers, with the checks of the seeded fuzzing in test_parsers.py.
libFuzzer keeps inputs that reach new code and mutates those, so it goes
where random mutation rarely does.

    python tests/fuzz/coverage_guided.py finger CORPUS_DIR -runs=200000
    python tests/fuzz/coverage_guided.py policy CORPUS_DIR -runs=200000 -seed=7
"""

import sys

import atheris

with atheris.instrument_imports():
    from flushctl import names  # noqa: F401
    from flushctl.protocols import finger
    from flushctl.gateway import gate
    from flushctl.gateway import replies  # noqa: F401
    from flushctl.protocols import smtpd_policy

import test_parsers  # noqa: E402  (the same checks; it imports the instrumented modules)


def main() -> None:
    target = sys.argv.pop(1)
    if target == "finger":
        def one(data: bytes) -> None:
            test_parsers.check_finger_line(data)
    elif target == "policy":
        empty = test_parsers.empty_gate()

        def one(data: bytes) -> None:
            test_parsers.check_policy_block(data, empty)
    else:
        sys.exit(f"unknown target {target!r}: finger or policy")
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
