"""The Weights & Biases sink, and `make_sink`, which builds the sinks of a run.

W&B never stops or stalls training: the mode falls back from online to offline when the server
cannot be reached within a bounded time, errors while logging are reported once and swallowed, and
everything logged is also written under the run directory by a `JsonlSink`, so a run without W&B
keeps its metrics, images, histograms and tables.
"""

import contextlib
import netrc
import os
import pathlib
import secrets
import string
import sys
import urllib.parse
from typing import Any, Literal, get_args

import jax
import numpy as np

from ..config import RunConfig, WandbMode
from .sinks import (
    ConsoleSink,
    JsonlSink,
    MultiSink,
    NullSink,
    Sink,
    check_image,
    confusion_table,
    histogram,
)

_ENV_MODES: dict[str, Literal["online", "offline", "disabled"]] = {
    "online": "online",
    "run": "online",
    "shared": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}
_RUN_ID_FILE = "wandb_run_id"


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _say(message: str) -> None:
    print(f"fsdm_eqx: {message}", file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _base_url(default: str) -> str:
    return os.environ.get("WANDB_BASE_URL") or default


def has_credentials(base_url: str) -> bool:
    """Whether a W&B API key is at hand without asking: ``WANDB_API_KEY`` or a netrc entry
    (``$NETRC`` or ``~/.netrc``) for the host of ``base_url``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(base_url).hostname
    path = pathlib.Path(os.environ.get("NETRC") or pathlib.Path.home() / ".netrc")
    if host is None or not path.is_file():
        return False
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return entry is not None and bool(entry[2])


def resolve_mode(
    mode: str, *, base_url: str
) -> tuple[Literal["online", "offline", "disabled"], str]:
    """The W&B mode a run uses, and why.

    ``"disabled"`` always wins; otherwise ``WANDB_MODE``, when set, is respected; otherwise an
    explicit ``"online"``/``"offline"`` is used as is, and ``"auto"`` is online exactly when
    `has_credentials` finds a key.
    """
    if mode not in get_args(WandbMode):
        raise ValueError(
            f"W&B mode {mode!r} is not allowed; choose one of "
            f"{', '.join(repr(m) for m in get_args(WandbMode))}."
        )
    if mode == "disabled":
        return "disabled", "W&B is disabled by the run configuration"
    env = os.environ.get("WANDB_MODE")
    if env:
        if env not in _ENV_MODES:
            raise ValueError(
                f"WANDB_MODE={env!r} is not a W&B mode; set it to one of "
                f"{', '.join(sorted(_ENV_MODES))} or unset it."
            )
        return _ENV_MODES[env], f"WANDB_MODE={env}"
    if mode == "online" or mode == "offline":
        return mode, f"the run configuration asks for {mode}"
    if has_credentials(base_url):
        return "online", "W&B credentials were found"
    host = urllib.parse.urlparse(base_url).hostname
    return "offline", f"no W&B credentials (WANDB_API_KEY or a netrc entry for {host})"


class WandbSink:
    """Logs to a Weights & Biases run and, through a `JsonlSink`, under ``run_dir``.

    Scalars go to ``run.log(metrics, step=step)``, images as ``wandb.Image``, histograms as
    ``wandb.Histogram`` (binned by `histogram`, as on disk) and tables as ``wandb.Table``. The W&B
    files live in ``run_dir/wandb``; the run id is kept in ``run_dir/wandb_run_id`` so that a
    resumed training run continues the same W&B run. Console capture by W&B is off.

    **Arguments:**
    - `run_dir`: the run's directory (created if missing).
    - `project`, `name`, `entity`: where the run appears on W&B (`entity=None`: the default).
    - `config`: the full run configuration as a JSON-able dict, shown as the run's config.
    - `mode`: `"auto"` (online when credentials exist, offline otherwise), `"online"`,
      `"offline"` or `"disabled"` (no W&B run; only the local copy). `WANDB_MODE`, when set,
      overrides all but `"disabled"`.
    - `init_timeout`: seconds to wait for the server; past it, or on any error, the run falls back
      to offline with one message on stderr.
    """

    def __init__(
        self,
        run_dir: str | pathlib.Path,
        *,
        project: str,
        name: str,
        config: dict[str, Any],
        mode: WandbMode = "auto",
        entity: str | None = None,
        init_timeout: float = 30.0,
    ) -> None:
        if not init_timeout > 0:
            raise ValueError(f"init_timeout={init_timeout!r} must be a positive number of seconds.")
        self.run_dir = pathlib.Path(run_dir)
        self.local = JsonlSink(self.run_dir)
        self.mode: Literal["online", "offline", "disabled"] = "disabled"
        self._run: Any = None
        self._wandb: Any = None
        self._failures = 0
        if mode == "disabled":
            return
        import wandb

        self._wandb = wandb
        requested, why = resolve_mode(mode, base_url=_base_url(wandb.Settings().base_url))
        if requested == "disabled":
            return
        id_file = self.run_dir / _RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else _new_run_id()
        arguments: dict[str, Any] = dict(
            project=project,
            name=name,
            entity=entity,
            config=config,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            settings=wandb.Settings(init_timeout=init_timeout, quiet=True, console="off"),
        )
        if requested == "online":
            try:
                self._run = wandb.init(mode="online", **arguments)
                self.mode = "online"
            except Exception as error:
                _say(
                    f"W&B could not start an online run within {init_timeout:g} s "
                    f"({_first_line(error)}); logging offline instead."
                )
                why = "the W&B server could not be reached"
                # The failed attempt lingers in W&B's service (holding its id, delaying the
                # offline run's flush): start from a fresh service.
                with contextlib.suppress(Exception):
                    wandb.teardown()
        if self._run is None:
            try:
                self._run = wandb.init(mode="offline", **arguments)
                self.mode = "offline"
            except Exception as error:
                _say(
                    f"W&B could not start an offline run either ({_first_line(error)}); "
                    f"metrics, images, histograms and tables are still written under {run_dir}."
                )
                return
        id_file.write_text(run_id)
        if self.mode == "offline":
            files = pathlib.Path(self._run.dir).parent
            _say(f"W&B is offline ({why}); upload the run later with: wandb sync {files}")
        else:
            _say(f"W&B run: {self._run.url}")

    def _call(self, what: str, step: int, function: Any, *args: Any, **kwargs: Any) -> None:
        if self._run is None:
            return
        try:
            function(*args, **kwargs)
        except Exception as error:
            self._failures += 1
            if self._failures == 1:
                _say(
                    f"W&B failed to log {what} at step {step} ({_first_line(error)}); the run "
                    f"goes on and everything is still written under {self.run_dir}. Further W&B "
                    "errors are counted, not shown."
                )

    def _log(self, values: dict[str, Any], step: int) -> None:
        self._run.log(values, step=int(step))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.local.log(metrics, step)
        self._call("metrics", step, self._log, {k: float(v) for k, v in metrics.items()}, step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.local.log_images(images, step)

        def send() -> None:
            wandb = self._wandb
            pixels = {k: check_image(k, np.asarray(v)) for k, v in images.items()}
            self._log({k: wandb.Image(v) for k, v in pixels.items()}, step)

        self._call("images", step, send)

    def log_histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        binned = {k: histogram(k, v) for k, v in values.items()}
        for name, (counts, edges) in binned.items():
            self.local.save_histogram(name, counts, edges, step)

        def send() -> None:
            wandb = self._wandb
            self._log({k: wandb.Histogram(np_histogram=v) for k, v in binned.items()}, step)

        self._call("histograms", step, send)

    def log_table(
        self, name: str, columns: list[str], rows: list[list[float | int | str]], step: int
    ) -> None:
        self.local.log_table(name, columns, rows, step)

        def send() -> None:
            table = self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            self._log({name: table}, step)

        self._call(f"table {name!r}", step, send)

    def log_confusion_matrix(
        self, name: str, classes: list[str], counts: np.ndarray, step: int
    ) -> None:
        self.local.log_confusion_matrix(name, classes, counts, step)
        columns, rows = confusion_table(classes, counts)

        def send() -> None:
            # W&B's confusion-matrix chart takes one (true, predicted) pair per query.
            matrix = np.asarray(counts)
            true, predicted = np.nonzero(matrix)
            repeats = matrix[true, predicted]
            chart = self._wandb.plot.confusion_matrix(
                y_true=np.repeat(true, repeats).tolist(),
                preds=np.repeat(predicted, repeats).tolist(),
                class_names=list(classes),
                title=name,
            )
            table = self._wandb.Table(columns=columns, data=rows)
            self._log({name: chart, f"{name}/counts": table}, step)

        self._call(f"confusion matrix {name!r}", step, send)

    def close(self) -> None:
        """Close the local files and finish the W&B run (uploading what is left when online);
        W&B's service is then stopped unless another W&B run is active, so that the run's files
        are complete when this returns."""
        self.local.close()
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish()
            # An offline run's files are complete only once W&B's service has stopped.
            if self._wandb.run is None:
                self._wandb.teardown()
        except Exception as error:
            self._failures += 1
            _say(f"W&B failed to finish the run ({_first_line(error)}).")
        if self._failures > 1:
            _say(f"W&B failed {self._failures} times in this run; the local copy is complete.")


def make_sink(run_config: RunConfig, *, name: str, config: dict[str, Any]) -> Sink:
    """The sinks of a training run: the console, and the local files plus W&B as
    ``run_config.wandb`` says. Processes other than 0 get a `NullSink`, so one host logs.

    **Arguments:**
    - `run_config`: `run_dir` and the `wandb*` settings.
    - `name`: the run's name on W&B.
    - `config`: the full run configuration as a JSON-able dict, for W&B.

    **Returns:** a `MultiSink` of a `ConsoleSink` and a `WandbSink` (a `JsonlSink` when W&B is
    disabled), or a `NullSink` off process 0.
    """
    if jax.process_index() != 0:
        return NullSink()
    if run_config.wandb == "disabled":
        files: Sink = JsonlSink(run_config.run_dir)
    else:
        files = WandbSink(
            run_config.run_dir,
            project=run_config.wandb_project,
            name=name,
            config=config,
            mode=run_config.wandb,
            entity=run_config.wandb_entity,
            init_timeout=run_config.wandb_init_timeout,
        )
    return MultiSink(ConsoleSink(), files)
