"""``aiockpt-run`` / ``python -m aiockpt.run``: torchrun's command line over the asyncio agent.

Flags keep torchrun's names (dashes or underscores) and defaults, and as torchrun's each can
come from a ``PET_<NAME>`` environment variable (``PET_NNODES``, ``PET_RDZV_ENDPOINT``: what
Kubeflow sets); a flag on the command line wins. The rendezvous is static (``--nnodes N`` with
``--node-rank`` and ``--master-addr/--master-port``), ``--standalone`` for one node on a free
port, or dynamic (``--rdzv-backend c10d --nnodes MIN:MAX --rdzv-endpoint HOST[:PORT]``:
nodes join and leave, see :mod:`aiockpt.elastic.dynamic`). Exit codes: 0 success, or a
closed dynamic rendezvous (the job ended before this node joined); 1 the workers failed
(torchelastic's failure report on stderr) or the launch itself failed; 128 + N after signal N
stopped the run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import uuid
from collections.abc import Callable

from aiockpt._runtime import run_on_fastest_loop
from aiockpt.elastic.agent import LocalElasticAgent
from aiockpt.elastic.bootstrap import DEFAULT_PRELOADS
from aiockpt.elastic.dynamic import DynamicRendezvousHandler, parse_rdzv_conf, settings_from_conf
from aiockpt.elastic.failures import format_failures
from aiockpt.elastic.logs import LogsSpecs, Std
from aiockpt.elastic.rendezvous import StaticRendezvous
from aiockpt.elastic.spec import DEFAULT_ROLE, RunResult, WorkerSpec
from aiockpt.errors import RendezvousError, RendezvousGracefulExitError, SignalException

__all__ = ["get_args_parser", "main", "parse_args"]

logger = logging.getLogger(__name__)

_DEFAULT_MASTER_PORT = 29500


def get_args_parser() -> argparse.ArgumentParser:
    """The argument parser, torchrun's flags with torchrun's help texts where they apply."""
    parser = argparse.ArgumentParser(
        prog="aiockpt-run",
        description="aiockpt Elastic Training Launcher (torchrun's flags; asyncio worker agent)",
    )
    add = parser.add_argument
    # Every numeric flag is validated by its argparse type, so that a bad value is an argparse
    # error (exit 2) naming the flag, before anything starts.
    add(
        "--nnodes",
        type=_nnodes,
        default="1",
        help="Number of nodes, or the range of nodes in form <minimum_nodes>:<maximum_nodes> "
        "(a range needs --rdzv-backend c10d).",
    )
    add(
        "--nproc-per-node",
        "--nproc_per_node",
        type=_nproc_per_node,
        default="1",
        help="Number of workers per node; supported values: [auto, cpu, gpu, int].",
    )
    add(
        "--standalone",
        action="store_true",
        help="Single-node job: the agent hosts its store on a free port and picks a fresh run "
        "id; --master-addr, --master-port and --run-id are ignored.",
    )
    add(
        "--run-id",
        "--run_id",
        "--rdzv-id",
        "--rdzv_id",
        dest="run_id",
        type=str,
        default="none",
        help="User-defined job id (names log directories; TORCHELASTIC_RUN_ID).",
    )
    add(
        "--rdzv-backend",
        "--rdzv_backend",
        type=str,
        default="static",
        choices=["static", "c10d"],
        help="Rendezvous backend: static (a fixed set of nodes, node 0 hosts the store) or c10d "
        "(nodes join and leave; the agent on --rdzv-endpoint hosts the store).",
    )
    add(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        type=str,
        default="",
        help="Rendezvous backend endpoint; usually in form <host>:<port> (default port 29400).",
    )
    add(
        "--rdzv-conf",
        "--rdzv_conf",
        type=str,
        default="",
        help="Additional rendezvous configuration (<key1>=<value1>,<key2>=<value2>,...): "
        "join_timeout (600), last_call_timeout (30), close_timeout (30), keep_alive_interval "
        "(5), keep_alive_max_attempt (3), is_host.",
    )
    add(
        "--local-addr",
        "--local_addr",
        type=str,
        default=None,
        help="Address of the local node. If specified, will use the given address for "
        "connection; else looks up the local node address instead (the fully qualified "
        "hostname).",
    )
    add(
        "--max-restarts",
        "--max_restarts",
        type=_integer(minimum=0),
        default=0,
        help="Maximum number of worker group restarts before failing.",
    )
    add(
        "--monitor-interval",
        "--monitor_interval",
        type=_seconds,
        default="0.1",
        help="Accepted for torchrun compatibility; unused (the agent awaits worker exits).",
    )
    add(
        "--start-method",
        "--start_method",
        type=str,
        default="spawn",
        choices=["spawn", "fork", "forkserver"],
        help="torchrun's multiprocessing start method. Accepted for compatibility, with no "
        "effect: the workers of aiockpt-run are the training script, each a separate exec'd "
        "process, as torchrun starts scripts whatever this flag says (torchrun uses it only "
        "for function entrypoints; those of aiockpt's LocalElasticAgent always start in a "
        "fresh interpreter, as with spawn).",
    )
    add(
        "--prestart-workers",
        "--prestart_workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep one spare worker interpreter per local slot, started (torch imported) "
        "while the current workers run, so that a restart or a membership change does not "
        "wait for imports; RANK, WORLD_SIZE, MASTER_* and the rest are set before the script "
        "runs (default: on; ignored with --no-python).",
    )
    add(
        "--prestart-imports",
        "--prestart_imports",
        type=str,
        default=",".join(DEFAULT_PRELOADS),
        help="Modules a pre-started worker imports ahead (comma-separated; empty: none), "
        "besides the script's top-level imports of installed packages (default: torch).",
    )
    add("--role", type=str, default=DEFAULT_ROLE, help="User-defined role for the workers.")
    add(
        "-m",
        "--module",
        action="store_true",
        help="Change each process to interpret the launch script as a Python module, executing "
        "with the same behavior as 'python -m'.",
    )
    add(
        "--no-python",
        "--no_python",
        action="store_true",
        help="Skip prepending the training script with 'python' - just execute it directly. "
        "Useful when the script is not a Python script.",
    )
    add(
        "--log-dir",
        "--log_dir",
        type=str,
        default=None,
        help="Base directory to use for log files (e.g. /var/log/torch/elastic); logs go to "
        "<log-dir>/<run-id>_<unique suffix>/attempt_<restart>/<local_rank>/ (a directory per "
        "run, as torchrun: a rerun keeps the earlier runs' logs).",
    )
    add(
        "-r",
        "--redirects",
        type=_std,
        default="0",
        help="Redirect std streams into a log file in the log directory (e.g. [-r 3] redirects "
        "both stdout+stderr for all workers, [-r 0:1,1:2] redirects stdout for local rank 0 and "
        "stderr for local rank 1).",
    )
    add(
        "-t",
        "--tee",
        type=_std,
        default="0",
        help="Tee std streams into a log file and also to console (see --redirects for format).",
    )
    add(
        "--local-ranks-filter",
        "--local_ranks_filter",
        type=str,
        default="",
        help="Only show logs from specified ranks in console (e.g. [--local_ranks_filter=0,1,2] "
        "will only show logs from rank 0, 1 and 2). This will only apply to stdout and stderr, "
        "not to log files saved via --redirect or --tee.",
    )
    add(
        "--log-line-prefix-template",
        "--log_line_prefix_template",
        type=str,
        default=os.environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"),
        help="Prefix of teed console lines, with ${role_name}, ${local_rank} and ${rank} "
        "(default: [${role_name}${local_rank}]:; env TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE).",
    )
    add(
        "--node-rank",
        "--node_rank",
        type=_integer(minimum=0),
        default=0,
        help="Rank of the node for multi-node distributed training.",
    )
    add(
        "--master-addr",
        "--master_addr",
        type=str,
        default="127.0.0.1",
        help="Address of the master node (rank 0). It should be either the IP address or the "
        "hostname of rank 0. For single node multi-proc training the --master-addr can simply "
        "be 127.0.0.1.",
    )
    add(
        "--master-port",
        "--master_port",
        type=_integer(minimum=0, maximum=65535),
        default=None,
        help="Port on the master node (rank 0) to be used for communication during distributed "
        f"training. Defaults to a free port on one node and {_DEFAULT_MASTER_PORT} on several.",
    )
    add(
        "--exit-barrier-timeout",
        "--exit_barrier_timeout",
        type=_seconds,
        default="300",
        help="Seconds a node whose workers succeeded waits for the other nodes.",
    )
    add(
        "--shutdown-timeout",
        "--shutdown_timeout",
        type=_seconds,
        # a string: argparse validates it like a given value, naming the flag
        default=os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"),
        help="Time in seconds to wait for graceful shutdown of worker processes before sending "
        "SIGKILL (env TORCH_ELASTIC_SHUTDOWN_TIMEOUT; default 30).",
    )
    add(
        "training_script",
        type=str,
        help="Full path to the (single GPU) training program/script to be launched in parallel, "
        "followed by all the arguments for the training script.",
    )
    add("training_script_args", nargs=argparse.REMAINDER)
    _defaults_from_environment(parser)
    return parser


def _defaults_from_environment(parser: argparse.ArgumentParser) -> None:
    """torchrun's ``env`` action: ``PET_<FLAG>`` sets a flag's default, e.g. ``PET_NNODES``
    for ``--nnodes`` and ``PET_RDZV_ID`` for ``--rdzv-id``. A default given as text is
    parsed by the flag's type like a value on the command line (a bad one is an argparse
    error naming the flag); switches take torchrun's ``0``/``1``."""
    for action in parser._actions:
        for option in action.option_strings:
            if not option.startswith("--") or (
                option.startswith("--no-") and isinstance(action, argparse.BooleanOptionalAction)
            ):
                continue  # one variable per flag: PET_PRESTART_WORKERS=0, not PET_NO_...
            value = os.environ.get("PET_" + option[2:].replace("-", "_").upper())
            if value is None:
                continue
            if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
                try:
                    action.default = bool(int(value))
                except ValueError:
                    parser.error(f"PET variable for {option}: expected 0 or 1, got {value!r}")
            else:
                action.default = value
            break


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); argparse exits 2 on bad flags."""
    return get_args_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> tuple[WorkerSpec, LogsSpecs]:
    """The worker spec and log settings the flags describe.

    Raises ``ValueError`` for inconsistent flags, ``NotADirectoryError`` for a file as log dir.
    """
    min_nodes, max_nodes = args.nnodes
    nproc = _resolve_nproc_per_node(args.nproc_per_node)
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        # as torchrun: N busy workers each with all cores' worth of OpenMP threads thrash
        logger.warning("setting OMP_NUM_THREADS=1 for each worker; tune it for your job")
        os.environ["OMP_NUM_THREADS"] = "1"
    rendezvous: StaticRendezvous | DynamicRendezvousHandler
    if args.standalone:
        if max_nodes != 1:
            raise ValueError("--standalone runs one node; drop --nnodes or --standalone")
        rendezvous = StaticRendezvous(run_id=uuid.uuid4().hex)
    elif args.rdzv_backend == "c10d":
        if not args.rdzv_endpoint:
            raise ValueError("--rdzv-backend c10d needs --rdzv-endpoint HOST[:PORT]")
        settings, is_host = settings_from_conf(
            args.run_id, min_nodes, max_nodes, parse_rdzv_conf(args.rdzv_conf)
        )
        rendezvous = DynamicRendezvousHandler(
            settings, args.rdzv_endpoint, local_addr=args.local_addr, is_host=is_host
        )
    else:
        if min_nodes != max_nodes:
            raise ValueError(
                f"--nnodes {min_nodes}:{max_nodes}: a range of nodes needs --rdzv-backend c10d"
            )
        nnodes = max_nodes
        if args.node_rank >= nnodes:
            raise ValueError(
                f"--node-rank must be less than --nnodes ({nnodes}), got {args.node_rank}"
            )
        port = args.master_port
        if port is None and nnodes > 1:
            port = _DEFAULT_MASTER_PORT
        rendezvous = StaticRendezvous(
            nnodes=nnodes,
            node_rank=args.node_rank,
            master_addr=args.master_addr,
            master_port=port,
            run_id=args.run_id,
        )
    if args.no_python and args.module:
        raise ValueError("Don't use both the '--no-python' flag and the '--module' flag")
    entrypoint: str
    cmd_args: list[str] = []
    if args.no_python:
        entrypoint = args.training_script
    else:
        entrypoint = os.environ.get("PYTHON_EXEC", sys.executable)
        cmd_args.append("-u")
        if args.module:
            cmd_args.append("-m")
        cmd_args.append(args.training_script)
    cmd_args.extend(args.training_script_args)
    ranks_filter = None
    if args.local_ranks_filter:
        try:
            ranks_filter = {int(rank) for rank in args.local_ranks_filter.split(",")}
        except ValueError as exc:
            raise ValueError(
                "--local-ranks-filter must be a comma-separated list of integers, e.g. 0,1,2"
            ) from exc
    spec = WorkerSpec(
        role=args.role,
        local_world_size=nproc,
        entrypoint=entrypoint,
        args=tuple(cmd_args),
        max_restarts=args.max_restarts,
        monitor_interval=args.monitor_interval,
        rdzv_handler=rendezvous,
    )
    logs_specs = LogsSpecs(
        log_dir=args.log_dir,
        redirects=args.redirects,
        tee=args.tee,
        local_ranks_filter=ranks_filter,
    )
    return spec, logs_specs


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``aiockpt-run``: run the agent, then exit with the job's code."""
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    args = parse_args(argv)
    try:
        spec, logs_specs = config_from_args(args)
    except (ValueError, OSError) as exc:
        get_args_parser().error(str(exc))
    agent = LocalElasticAgent(
        spec,
        logs_specs,
        exit_barrier_timeout=args.exit_barrier_timeout,
        log_line_prefix_template=args.log_line_prefix_template,
        shutdown_timeout=args.shutdown_timeout,
        prestart_workers=args.prestart_workers and not args.no_python,
        prestart_imports=[
            name.strip() for name in args.prestart_imports.split(",") if name.strip()
        ],
    )
    try:
        result: RunResult = run_on_fastest_loop(agent.run())
    except SignalException as exc:
        sys.exit(128 + exc.sigval)
    except RendezvousGracefulExitError as exc:
        # torch's agent: a closed rendezvous means the job is over, not that this node failed
        print(f"aiockpt-run: {exc}; exiting", file=sys.stderr)
        return
    except (FileNotFoundError, RendezvousError) as exc:
        print(f"aiockpt-run: {exc}", file=sys.stderr)
        sys.exit(1)
    if result.is_failed():
        print(format_failures(spec.get_entrypoint_name(), result.failures), file=sys.stderr)
        sys.exit(1)


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type: a finite, non-negative number of seconds (every wait is bounded)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _std(text: str) -> Std | dict[int, Std]:
    """An argparse type: torchrun's ``--redirects``/``--tee`` syntax."""
    try:
        return Std.from_str(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nnodes(text: str) -> tuple[int, int]:
    """An argparse type: ``N`` or ``MIN:MAX`` with 1 <= MIN <= MAX; ``(min, max)``."""
    low, _, high = text.partition(":")
    try:
        min_nodes, max_nodes = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None
    if min_nodes < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    if max_nodes < min_nodes:
        raise argparse.ArgumentTypeError(f"MAX must be >= MIN, got {text!r}")
    return min_nodes, max_nodes


def _nproc_per_node(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``gpu`` or a positive integer, kept as text: the
    device counts are looked up once the flags are all valid."""
    if text not in ("auto", "cpu", "gpu"):
        _integer(minimum=1)(text)
    return text


def _resolve_nproc_per_node(value: str) -> int:
    """The worker count ``--nproc-per-node`` means. Raises ``ValueError`` for ``gpu``
    without CUDA."""
    if value == "cpu":
        return os.cpu_count() or 1
    if value in ("gpu", "auto"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
        if value == "gpu":
            raise ValueError("--nproc-per-node gpu: CUDA is not available")
        return os.cpu_count() or 1
    return int(value)
