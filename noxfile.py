"""Developer sessions: CI runs `nox -s lint typecheck tests`; `benchmark` times hot paths."""

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check over the whole tree."""
    session.install("ruff>=0.15")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Pyright (strict) over the library."""
    session.install("-e", ".[dev]")
    session.run("pyright", "--pythonpath", f"{session.virtualenv.location}/bin/python", "fsdm_eqx")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Pytest with jaxtyping + beartype over `fsdm_eqx`. Pass `--all` to include slow tests."""
    session.install("-e", ".[dev]")
    args = list(session.posargs)
    if "--all" in args:
        args.remove("--all")
        args += ["-m", "not gpu"]
    session.run("pytest", *args)


@nox.session(python=PYTHON)
def benchmark(session: nox.Session) -> None:
    """pytest-benchmark suites; figures appended to `benchmarks/results/<machine>.json`, then
    tabulated in `benchmarks/RESULTS.md` (pytest-benchmark autosaves to `.benchmarks/`)."""
    session.install("-e", ".[dev]")
    session.run(
        "pytest",
        "benchmarks",
        "-p",
        "no:cacheprovider",
        "--benchmark-only",
        "--benchmark-autosave",
        "-o",
        "addopts=",
        *session.posargs,
    )
    session.run("python", "benchmarks/report.py")
