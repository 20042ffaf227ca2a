"""The `phema` command line: inspect, solve, reconstruct, average, import, demo."""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from phema import _core, files, naming
from phema.errors import PhemaError
from phema.store import normalize_dtype
from phema.targets import Targets

if TYPE_CHECKING:
    from phema.reconstruction import Reconstruction
    from phema.solver import Solution
    from phema.store import Store


class UserError(PhemaError):
    """A mistake in the command line or its input: reported as one line, no traceback."""


class UserCodeError(Exception):
    """The user's own code (`--model`, `--eval`) raised: reported with its traceback."""


# Most values one list (`--sigma-rel`, `--weights`, `--times`) may hold, checked before a range
# is expanded; solver.MAX_TARGETS bounds targets the same way.
MAX_LIST = 10_000
MAX_THREADS = 1024
MAX_DEMO_STEPS = 10_000_000


class Joined(argparse.Action):
    """A list option given more than once means all its lists (`--sigma-rel 0.05 --sigma-rel
    0.1` is `--sigma-rel 0.05,0.1`), not the last one alone."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{before},{values}" if before else values)


def parse_list(text: str) -> list[float]:
    """`0.05,0.1` or an inclusive range `a:b:step` (both may be mixed: `0.01:0.05:0.01,0.2`);
    finite numbers only, at most MAX_LIST of them."""
    out: list[float] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            numbers = [float(x) for x in part.split(":")]
        except ValueError:
            raise UserError(f"{part!r} is not a number or a:b:step range") from None
        if len(numbers) not in (1, 3) or not all(map(math.isfinite, numbers)):
            raise UserError(f"{part!r} is not a finite number or a:b:step range")
        if len(numbers) == 1:
            out += numbers
        else:
            a, b, step = numbers
            if step <= 0 or b < a:
                raise UserError(f"range {part!r}: need start <= stop and step > 0")
            n = math.floor((b - a) / step + 1e-9) + 1
            if len(out) + n > MAX_LIST:
                raise UserError(f"range {part!r} gives {n:.3g} values: at most {MAX_LIST}")
            out.extend(round(a + i * step, 12) for i in range(n))
        if len(out) > MAX_LIST:
            raise UserError(f"{text!r} holds more than {MAX_LIST} values")
    if not out:
        raise UserError(f"{text!r} is an empty list")
    return out


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def parse_size(text: str) -> int:
    """`500MB`, `2GB`, `1.5G`, `4096` -> bytes (at least 1, at most 2**63)."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "": 1}
    for suffix in sorted(scale, key=len, reverse=True):
        if t.endswith(suffix):
            try:
                size = float(t[: len(t) - len(suffix)]) * scale[suffix]
            except ValueError:
                break
            if math.isfinite(size) and 1 <= size <= naming.MAX_SHARD_SIZE:
                return int(size)
            break
    raise UserError(f"shard size {text!r} is not a size like 500MB or 2GB (1 byte to 2**63)")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def _open(args: argparse.Namespace, strict: bool = True) -> Store:
    """The store named on the command line: a phema store, or plain checkpoints."""
    from phema.store import open_store

    if getattr(args, "checkpoints", False):
        from phema.store import open_checkpoints

        times = parse_list(args.times) if args.times else None
        return open_checkpoints(
            args.store, times=times, **({"pattern": args.pattern} if args.pattern else {})
        )
    store = open_store(args.store, strict=strict)
    if strict:  # inspect lists them as problems
        for why in store.incomplete:
            print(f"note: left out {why}", file=sys.stderr)
    if not store.snapshots and any("phema metadata" in why for _, why in store.ignored):
        raise UserError(
            f"{args.store} holds safetensors files but no phema snapshots; "
            "for ordinary checkpoints add --checkpoints"
        )
    return store


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _open(args, strict=False)
    print(
        f"store {store.path}: {len(store)} snapshots, {_size(sum(s.size for s in store.snapshots))}"
    )
    if store.snapshots:
        by_profile: dict[tuple[float, str], list] = {}
        for s in store.snapshots:
            key = (s.gamma if s.gamma is not None else math.inf, s.kind)
            by_profile.setdefault(key, []).append(s)
        rows = []
        for (gamma, _), snaps in sorted(by_profile.items()):
            ts = [s.t for s in snaps]
            rows.append(
                [
                    snaps[0].kind,
                    "-" if gamma == math.inf else f"{snaps[0].sigma_rel:.4f}",
                    "-" if gamma == math.inf else f"{gamma:.4f}",
                    str(len(snaps)),
                    f"{min(ts):g} .. {max(ts):g}",
                    ",".join(sorted({s.dtype for s in snaps})),
                    _size(sum(s.size for s in snaps)),
                ]
            )
        print(_table(rows, ["kind", "sigma_rel", "gamma", "count", "t range", "dtype", "size"]))
        print(f"tensors per snapshot: {store.snapshots[0].n_tensors}")
        worlds = sorted({s.world_size for s in store.snapshots})
        if worlds != [1]:
            print(f"sharded training: snapshots in {' or '.join(map(str, worlds))} rank files each")
        if args.verbose:
            print()
            rows = [
                [f"{s.t:g}", f"{s.sigma_rel or 0:.4f}", s.dtype, _size(s.size), s.name]
                for s in store.snapshots
            ]
            print(_table(rows, ["t", "sigma_rel", "dtype", "size", "file"]))
        _print_feasible(store)
    _print_ignored(store)
    for p in store.problems + store.incomplete:
        print(f"problem: {p}")
    changed = _verify(store) if args.verify else 0
    return 1 if store.problems or store.incomplete or changed else 0


def _print_ignored(store: Store) -> None:
    for path, why in store.ignored:
        print(f"note: ignored {path}: {why}")


def _verify(store: Store) -> int:
    """Checks every snapshot file against the checksum it recorded; returns how many differ."""
    counts = {"ok": 0, "not recorded": 0, "mismatch": 0}
    for s in store.snapshots:
        for path in s.paths:
            status, recorded, computed = _core.verify_checksum(path)
            counts[status] += 1
            if status == "mismatch":
                print(
                    f"problem: {path} changed after it was written (checksum {recorded}, "
                    f"now {computed})"
                )
    print(
        f"verified {sum(counts.values())} files: {counts['ok']} intact, {counts['mismatch']} "
        f"changed, {counts['not recorded']} without a checksum (written by another tool or an "
        "older phema)"
    )
    return counts["mismatch"]


def _print_feasible(store: Store) -> None:
    """The sigma_rel range phema stands behind at the last time and at a few earlier ones."""
    from phema.solver import feasible_sigma_rels

    times = sorted({s.t for s in store.snapshots})
    last = times[-1]
    picks = sorted({times[-1]} | {times[int(f * (len(times) - 1))] for f in (0.25, 0.5, 0.75)})
    rows = []
    for t in reversed(picks):
        span = feasible_sigma_rels(store, t)
        rows.append([f"{t:g}", f"{span[0]:.3f} .. {span[1]:.3f}" if span else "none"])
    print(f"feasible sigma_rel (every snapshot used; last time t={last:g}):")
    print(_table(rows, ["t", "sigma_rel"]))


def _tensor_sigma_rels(args: argparse.Namespace) -> list[tuple[str, float]] | None:
    """`--tensor-sigma-rel PATTERN=SIGMA_REL` options as (pattern, sigma_rel) pairs."""
    pairs = []
    for text in getattr(args, "tensor_sigma_rel", None) or []:
        pattern, sep, value = text.rpartition("=")
        if not sep or not pattern:
            raise UserError(f"--tensor-sigma-rel {text!r}: expected PATTERN=SIGMA_REL")
        [v] = parse_list(value)
        pairs.append((pattern, v))
    return pairs or None


def _targets(args: argparse.Namespace) -> dict:
    kw = {
        "sigma_rels": parse_list(args.sigma_rel) if args.sigma_rel else None,
        "gammas": parse_list(args.gamma) if args.gamma else None,
        "betas": parse_list(args.beta) if args.beta else None,
        "halflives": parse_list(args.halflife) if args.halflife else None,
        "dt": args.dt,
        "at": args.at,
        "noise": "auto" if args.noise is None else args.noise,
        "causal": args.causal,
        "tensor_sigma_rels": _tensor_sigma_rels(args),
        # Kernels (docs/kernels.md): comma lists, and one --merge / --bema per option.
        "windows": args.window.split(",") if args.window else None,
        "last": parse_list(args.last) if args.last else None,
        "merges": args.merge or None,
        "bema": args.bema or None,
        "mixes": args.mix or None,
        "allow_extrapolation": args.allow_extrapolation,
    }
    kinds = ("sigma_rels", "gammas", "betas", "halflives", "tensor_sigma_rels")
    if not any(kw[k] for k in (*kinds, "windows", "last", "merges", "bema", "mixes")):
        raise UserError(
            "give at least one target: --sigma-rel, --gamma, --beta, --halflife, --window, "
            "--last, --merge, --bema or --mix"
        )
    return kw


def _report_rows(sol: Solution, extra: list[list[str]] | None = None) -> list[list[str]]:
    # From the solution's fields (not `Solution.rows`): the command prints what it was handed.
    rows = []
    for k, target in enumerate(sol.targets):
        cdf = float(sol.cdf_error[k])
        row = [
            target.label + (" POOR" if sol.poor[k] else ""),
            f"{sol.sigma_rel[k]:.4f}",
            f"{sol.fit_error[k]:.2e}",
            "-" if math.isnan(cdf) else f"{cdf:.2e}",
            f"{sol.gain[k]:.2f}",
            f"{sol.mass[k]:.6f}",
            str(int((sol.weights[:, k] != 0).sum())),
        ]
        if sol.regularized[k]:
            row[2] += f" (lstsq {sol.lstsq_fit_error[k]:.1e}, gain {sol.lstsq_gain[k]:.1f})"
        rows.append(row + (extra[k] if extra else []))
    return rows


_REPORT = ["target", "sigma_rel", "fit error", "misplaced", "gain", "sum x", "snapshots"]


def _poor_note(sol: Solution) -> list[str]:
    bad = sol.poor_targets()
    if not bad:
        return []
    return [
        f"{len(bad)} target(s) marked POOR cannot be reconstructed faithfully "
        f"(limits: {sol.limits()}); reconstruct refuses them without --allow-poor-fit"
    ]


def cmd_solve(args: argparse.Namespace) -> int:
    store = _open(args)
    sol = Targets.of(**_targets(args)).solve(store)
    if args.json:
        print(sol.to_json())
        return 0
    print(f"{len(store)} snapshots, target time t={sol.targets[0].t:g}")
    print(_table(_report_rows(sol), _REPORT))
    for n in sol.notes + _poor_note(sol):
        print(f"note: {n}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from phema.reconstruction import reconstruct

    _threads(args)
    store = _open(args)
    with _cluster(args) as client:
        written = reconstruct(
            store,
            **_targets(args),
            out=args.out,
            dtype=args.dtype,
            shard_size=parse_size(args.shard_size) if args.shard_size else None,
            allow_poor_fit=args.allow_poor_fit,
            progress=sys.stderr.isatty() and not args.quiet,
            per_rank=args.per_rank,
            like=args.like,
            client=client,
            verify=not args.no_verify,
        )
    sol = written.solution
    rows = _report_rows(sol, [[o] for o in _outputs_per_column(written, args.out)])
    print(_table(rows, [*_REPORT, "output"]))
    print(f"{_read_summary(store, written.stats)}; wrote {_count(len(written), 'file')}")
    for n in sol.notes:
        print(f"note: {n}")
    if args.checkpoints:  # a store's stray files are inspect's business
        _print_ignored(store)
    return 0


def _read_summary(store: Store, stats: dict[str, Any]) -> str:
    """What was read: the snapshots and their size on disk; on a cluster, whose tasks may each
    read a snapshot for their share of the outputs, also the bytes read in all."""
    size = sum(store.snapshots[i].size for i in stats["read"])
    text = f"read {_count(len(stats['read']), 'snapshot')}, {_size(size)}"
    if stats["bytes_read"] > size:
        text += f" ({_size(stats['bytes_read'])} read in all by the cluster's tasks)"
    return text


def _count(n: int, what: str) -> str:
    """`1 file`, `2 files`."""
    return f"{n} {what}{'' if n == 1 else 's'}"


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Any]:
    """The Dask client `--scheduler` or `--workers` asks for (None: this machine alone)."""
    if args.scheduler is None and args.workers is None:
        yield None
        return
    if args.scheduler is not None and args.workers is not None:
        raise UserError("give --scheduler or --workers, not both")
    cores = os.cpu_count() or 1
    if args.workers is not None and not 1 <= args.workers <= cores:
        # Each worker is a process with its own engine: more than the cores only compete for them
        # (a thousand of them exhaust the machine).
        raise UserError(
            f"--workers {args.workers}: a local cluster takes 1 to {cores} processes, one per "
            "core of this machine; for more machines give --scheduler"
        )
    from phema.cluster import connect

    try:
        client = connect(args.scheduler, args.workers)
    except (OSError, TimeoutError, ValueError) as e:
        raise UserError(f"--scheduler {args.scheduler}: cannot connect ({e})") from None
    try:
        yield client
    finally:
        client.close()
        if args.workers is not None:
            client.cluster.close()


def _threads(args: argparse.Namespace) -> None:
    # The engine's thread pool starts on first use and reads this then.
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:
            raise UserError(f"--threads {args.threads}: need 1 to {MAX_THREADS}")
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)


def cmd_average(args: argparse.Namespace) -> int:
    import warnings

    from phema.average import average

    _threads(args)
    weights = parse_list(args.weights) if args.weights else None
    stats: dict = {}
    with warnings.catch_warnings(record=True) as caught, _cluster(args) as client:
        warnings.simplefilter("always")
        paths = average(
            args.checkpoints,
            weights=weights,
            out=args.out,
            dtype=args.dtype,
            shard_size=parse_size(args.shard_size) if args.shard_size else None,
            progress=sys.stderr.isatty() and not args.quiet,
            stats=stats,
            client=client,
            like=args.like,
        )
    for w in caught:
        print(f"note: {w.message}")
    print(f"averaged {len(stats['read'])} checkpoints ({_size(stats['bytes_read'])} read) into:")
    for p in paths:
        print(f"  {p}")
    return 0


def _outputs_per_column(written: Reconstruction, out: str) -> list[str]:
    """Each solved column's output, briefly: its file, its rank files, or its directory of
    shards; a column only some tensors take says so."""
    result = ["(some tensors)"] * len(written.solution.targets)
    for o in written.outputs:
        first = os.path.relpath(o.paths[0], out)
        if len(o.paths) == 1:
            result[o.column] = first
        elif ".rank" in os.path.basename(first):
            result[o.column] = re.sub(r"rank\d+-of", "rank*-of", first)
        else:
            result[o.column] = f"{o.label}/ ({len(o.paths)} files)"
    return result


def _load_callable(spec: str, flag: str) -> Any:
    """`module:name` or `path/to/file.py:name` as the object it names."""
    import importlib
    import importlib.util

    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"{flag} {spec!r}: expected MODULE:NAME or FILE.py:NAME")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise UserError(f"{flag} {spec!r}: no file {where}")
            module_spec = importlib.util.spec_from_file_location(
                os.path.basename(where)[:-3], where
            )
            if module_spec is None or module_spec.loader is None:
                raise UserError(f"{flag} {spec!r}: {where} cannot be imported")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            # As `python -m`: modules in the working directory are importable.
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise UserError(f"{flag} {spec!r}: no module {e.name!r}") from None
    except UserError:
        raise
    except Exception as e:
        raise UserCodeError(f"{flag} {spec!r}: importing {where} failed") from e
    obj = getattr(module, name, None)
    if not callable(obj):
        raise UserError(f"{flag} {spec!r}: {where} has no callable {name!r}")
    return obj


def _user_code(f: Any, what: str) -> Any:
    """`f` whose exceptions are reported as the user's own, with their traceback."""

    def call(*args: Any) -> Any:
        try:
            return f(*args)
        except Exception as e:
            raise UserCodeError(f"{what} raised {type(e).__name__}") from e

    return call


def cmd_sweep(args: argparse.Namespace) -> int:
    from phema.sweeps import SweepRow, sweep

    _threads(args)
    store = _open(args)
    kw = _targets(args)
    at: Any = kw.pop("at")
    if at is not None:
        at = "all" if at == "all" else parse_list(at)
    files.check_outputs(args.out, ["sweep.csv", "sweep.png"], store.inputs)
    if args.dtype is not None:
        normalize_dtype(args.dtype)  # a typo is refused before anything is evaluated
    model = _user_code(_load_callable(args.model, "--model"), args.model)()
    evaluate = _user_code(_load_callable(args.eval, "--eval"), args.eval)
    header = ["target", "t", "sigma_rel", "fit error", "gain"]
    printed: list[str] = []
    shown: set[int] = set()

    def show(row: SweepRow) -> None:
        shown.add(id(row))
        if not printed:
            printed.extend(row.metrics)
            print("  ".join(f"{h:>14}" for h in header + printed))
        cells = [row.label, f"{row.t:g}", f"{row.sigma_rel:.4f}", f"{row.fit_error:.2e}"]
        cells += [f"{row.gain:.2f}"] + [f"{row.metrics.get(m, math.nan):.6g}" for m in printed]
        print("  ".join(f"{c:>14}" for c in cells), flush=True)

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sweep(
            store,
            model,
            evaluate,
            **kw,
            at=at,
            vary=args.vary,
            batch=args.batch,
            results=os.path.join(args.out, "sweep.csv"),
            raw=args.raw,
            progress=sys.stderr.isatty() and not args.quiet,
            on_row=show,
        )
    for w in caught:
        print(f"note: {w.message}")
    reused = [row for row in result.rows if id(row) not in shown]
    for row in reused:
        show(row)
    if result.raw is not None and result.raw.metrics:
        show(result.raw)
    if not result.rows:
        raise UserError("no target could be evaluated (see the notes)")
    csv = os.path.join(args.out, "sweep.csv")
    if reused:
        print(f"note: {_count(len(reused), 'row')} reused from the earlier results in {csv}")
    best = result.best(args.metric, args.mode)
    metric = args.metric or result.metric_names[0]
    png = result.plot(os.path.join(args.out, "sweep.png"), metric, args.mode)
    written = result.save_best(args.out, metric, args.mode, dtype=args.dtype, like=args.like)
    path = os.path.commonpath(written) if args.like else written[0]
    baseline = ""
    if result.raw is not None and metric in result.raw.metrics:
        baseline = f" (raw weights: {result.raw.metrics[metric]:.6g})"
    print(
        f"best {metric} {best.metrics[metric]:.6g}{baseline} at {best.label} (t={best.t:g}); "
        f"wrote {path}, {png} and {csv}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from phema.importers import import_store

    paths = import_store(
        args.store,
        args.src,
        kind=args.kind,
        sigma_rels=parse_list(args.sigma_rel) if args.sigma_rel else None,
        update_every=args.update_every,
        times=parse_list(args.times) if args.times else None,
        strip_prefix=args.strip_prefix,
        dtype=args.dtype,
        append=args.append,
    )
    print(f"imported {len(paths)} snapshots from {args.src} into {args.store}")
    errors = [
        float(e) for p in paths if (e := _metadata(p).get("phema.import_profile_error")) is not None
    ]
    if errors:
        print(
            f"note: the profiles ema-pytorch tracked differ from the stored power profiles by "
            f"at most {max(errors):.2e} (relative L2; phema.import_profile_error)"
        )
    return 0


def _metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        return dict(f.metadata() or {})


def cmd_demo(args: argparse.Namespace) -> int:
    if args.emag:
        if args.steps is not None and args.steps < 1:
            raise UserError(f"--steps {args.steps}: need at least 1 training step")
        from phema.guidance.digits import run_demo as run_emag_demo

        run_emag_demo(out=args.out, seed=args.seed, train_steps=args.steps)
        return 0
    from phema.demo.run import run_demo

    if args.steps is not None and not 1 <= args.steps <= MAX_DEMO_STEPS:
        raise UserError(f"--steps {args.steps}: need 1 to {MAX_DEMO_STEPS}")
    run_demo(out=args.out, steps=args.steps, seed=args.seed)
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (unless the help says it), examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False  # 0 is a default to show
        if unset or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


STORE_HELP = (
    "a phema store: the directory PostHocEMA (or `phema import`) writes snapshots into; "
    "with --checkpoints, a directory of ordinary checkpoints"
)

# One example per command, shown under its --help.
EXAMPLES = {
    "inspect": "phema inspect runs/ema\n  phema inspect ckpts/ --checkpoints --verify",
    "solve": "phema solve runs/ema --sigma-rel 0.05:0.25:0.05\n"
    "  phema solve runs/ema --beta 0.999,0.9999 --dt 1 --at 50000",
    "reconstruct": "phema reconstruct runs/ema --sigma-rel 0.1 --out ema-0.1\n"
    "  phema reconstruct out/ --checkpoints --sigma-rel 0.1 --like out/checkpoint-500 "
    "--out ema",
    "sweep": "phema sweep runs/ema --sigma-rel 0.02:0.2:0.02 --model my_model:build "
    "--eval my_model:evaluate --out sweep --mode max",
    "average": "phema average ckpt-100 ckpt-200 ckpt-300 --out soup\n"
    "  phema average a.safetensors b.safetensors --weights 0.7,0.3 --out mix",
    "import": "phema import ema-pytorch results/ runs/imported --sigma-rel 0.05,0.28",
    "demo": "phema demo --out phema-demo",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `phema`."""
    p = argparse.ArgumentParser(
        prog="phema",
        description="Post-hoc EMA: rebuild the weights any EMA length would have given.",
        epilog="COMMAND --help shows each command's options, defaults and an example.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"phema {_core.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=kw.pop("description", help),
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=_HelpFormatter,
            **kw,
        )

    def raw(s: argparse.ArgumentParser) -> None:
        g = s.add_argument_group(
            "ordinary checkpoints (post-hoc EMA for runs that were never tracked)"
        )
        g.add_argument(
            "--checkpoints", action="store_true", help="STORE is a directory of plain checkpoints"
        )
        g.add_argument(
            "--times", help="their training times in name order (default: metadata or name)"
        )
        g.add_argument("--pattern", help="regex whose last match in a name is its time")

    s = command("inspect", "what a store holds: times, profiles, sizes, problems")
    s.add_argument("store", metavar="STORE", help=STORE_HELP)
    s.add_argument("-v", "--verbose", action="store_true", help="list every snapshot")
    s.add_argument(
        "--verify",
        action="store_true",
        help="read every snapshot and check it against the checksum written with it",
    )
    raw(s)
    s.set_defaults(func=cmd_inspect)

    def targets(s: argparse.ArgumentParser, times: str = "one") -> None:
        s.add_argument("store", metavar="STORE", help=STORE_HELP)
        s.add_argument(
            "--sigma-rel",
            action=Joined,
            help="list, e.g. 0.05,0.1 or 0.01:0.25:0.01 (inclusive)",
        )
        s.add_argument("--gamma", action=Joined, help="power-function exponents, e.g. 6.94,16.97")
        s.add_argument(
            "--beta", action=Joined, help="classic EMA decays per --dt, e.g. 0.999,0.9999"
        )
        s.add_argument("--halflife", action=Joined, help="classic EMA half-lives in time units")
        s.add_argument("--dt", type=float, default=1.0, help="time units per update for --beta")
        s.add_argument(
            "--window", action=Joined, help="uniform averages over these lengths, e.g. 2000,20%%"
        )
        s.add_argument("--last", action=Joined, help="averages of the last N checkpoints, e.g. 4,8")
        s.add_argument(
            "--merge",
            action="append",
            metavar="SHAPE:WINDOW",
            help="decay-emulating merge (linear, cosine, 1-sqrt), e.g. linear:20%% (repeatable)",
        )
        s.add_argument(
            "--bema",
            action="append",
            metavar="NAME=VALUE,...",
            help="BEMA with tau, phi, kappa, eta, rho, gamma (TRL defaults otherwise), e.g. "
            "tau=1000,kappa=0.5; '' for the defaults (repeatable)",
        )
        s.add_argument(
            "--mix",
            action="append",
            metavar="SNAPSHOT=WEIGHT,...",
            help="explicit weights on snapshots named by file name or time (repeatable)",
        )
        s.add_argument(
            "--allow-extrapolation",
            action="store_true",
            help="let --mix weights be negative or not sum to 1",
        )
        if times == "one":
            s.add_argument("--at", type=float, help="target time (default: the last snapshot's)")
        else:
            s.add_argument(
                "--at", help="target time(s): one, a list, or 'all' (default: the last snapshot's)"
            )
        s.add_argument(
            "--tensor-sigma-rel",
            action="append",
            metavar="PATTERN=SIGMA_REL",
            help="give the tensors PATTERN matches their own sigma_rel (first match wins; "
            "repeatable; e.g. 'encoder.*=0.05')",
        )
        s.add_argument(
            "--noise",
            type=float,
            help="snapshot rounding noise (default: from dtype; 0 = plain least squares)",
        )
        s.add_argument(
            "--causal",
            action="store_true",
            help="use only snapshots at or before the target time (default: every snapshot)",
        )
        raw(s)

    def like(s: argparse.ArgumentParser, what: str) -> None:
        s.add_argument(
            "--like",
            metavar="CHECKPOINT_DIR",
            help=f"{what} as a directory laid out like this transformers/diffusers checkpoint "
            "(weights file, dtype, config and tokenizer files), for from_pretrained",
        )

    def engine(s: argparse.ArgumentParser) -> None:
        s.add_argument("--threads", type=int, help="worker threads (default: all cores)")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def cluster(s: argparse.ArgumentParser) -> None:
        g = s.add_argument_group("on a Dask cluster (docs/distributed.md)")
        g.add_argument("--scheduler", metavar="ADDRESS", help="e.g. tcp://HOST:8786")
        g.add_argument("--workers", type=int, metavar="N", help="a local cluster of N processes")

    s = command("solve", "weights, fit error and gain per target")
    targets(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_solve)

    s = command("reconstruct", "write the averaged weights for every target")
    targets(s)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument(
        "--dtype",
        help="f16, bf16 or f32 (default: the model's, as the store or checkpoints record it, "
        "else f16; with --like: the checkpoint's)",
    )
    s.add_argument(
        "--no-verify",
        action="store_true",
        help="do not verify the snapshots' checksums as they are read (docs/store-format.md)",
    )
    s.add_argument("--shard-size", help="split outputs into shards of this size, e.g. 2GB")
    like(s, "write each target")
    s.add_argument(
        "--per-rank",
        action="store_true",
        help="for a store of sharded training: one output file per rank, sharded like the run "
        "(to resume on as many ranks); default: full tensors",
    )
    s.add_argument(
        "--allow-poor-fit",
        action="store_true",
        help="write targets phema cannot reconstruct faithfully too (marked phema.poor_fit)",
    )
    engine(s)
    cluster(s)
    s.set_defaults(func=cmd_reconstruct)

    s = command(
        "sweep",
        "evaluate every target with your model and metric: table, CSV, figure, best weights",
    )
    targets(s, times="many")
    s.add_argument("--model", required=True, help="MODULE:NAME or FILE.py:NAME making the model")
    s.add_argument(
        "--eval", required=True, help="MODULE:NAME or FILE.py:NAME: evaluate(model) -> metrics"
    )
    s.add_argument("--out", required=True, help="directory for sweep.csv, sweep.png, best weights")
    s.add_argument("--vary", metavar="PATTERN", help="vary only these tensors' EMA length")
    s.add_argument("--batch", type=int, help="targets per pass (default: what memory allows)")
    s.add_argument("--raw", help="raw-weights checkpoint to evaluate as the baseline")
    s.add_argument("--metric", help="metric choosing the best (default: the first)")
    s.add_argument("--mode", choices=("min", "max"), default="min", help="lower or higher wins")
    s.add_argument(
        "--dtype",
        help="dtype of the best weights written (default: the model's; with --like: the "
        "checkpoint's)",
    )
    like(s, "write the best weights")
    engine(s)
    s.set_defaults(func=cmd_sweep)

    s = command("average", "weighted average of checkpoints (SWA, soups) in bounded memory")
    s.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help=".safetensors file or checkpoint directory"
    )
    s.add_argument("--weights", help="w1,w2,... (default: uniform)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument(
        "--dtype",
        help="f16, bf16 or f32 (default: the inputs', or the model's that phema snapshots record)",
    )
    s.add_argument("--shard-size", help="shard the output, e.g. 5GB (default: as the inputs)")
    like(s, "write the average")
    engine(s)
    cluster(s)
    s.set_defaults(func=cmd_average)

    s = command(
        "import",
        "write another project's EMA snapshots or checkpoints as a phema store",
        description="KIND: edm2 (network-snapshot-*.pkl, training-state-*.pt), ema-pytorch "
        "(PostHocEMA folder of {ind}.{step}.pt), lightning (.ckpt), timm (.pth), dcp "
        "(PyTorch Distributed Checkpoint directories). See docs/importers.md.",
    )
    s.add_argument(
        "kind",
        choices=["edm2", "ema-pytorch", "lightning", "timm", "dcp"],
        help="the source's format",
    )
    s.add_argument("src", help="the run's directory (or one file)")
    s.add_argument(
        "store", metavar="STORE", help="the phema store to write (a new or empty directory)"
    )
    s.add_argument("--sigma-rel", help="ema-pytorch: the sigma_rels of the run, one per ind")
    s.add_argument(
        "--update-every", type=int, help="ema-pytorch: the run's update_every (its default: 100)"
    )
    s.add_argument("--times", help="lightning/timm/dcp: training times in name order")
    s.add_argument("--strip-prefix", help="remove this prefix from tensor names, e.g. model.")
    s.add_argument("--dtype", help="f16, bf16 or f32 (default: the source's)")
    s.add_argument("--append", action="store_true", help="add to the run already stored in STORE")
    s.set_defaults(func=cmd_import)

    s = command("demo", "train a toy model, sweep EMA lengths, draw the result")
    s.add_argument("--out", default="phema-demo", help="output directory")
    s.add_argument(
        "--steps", type=int, default=None, help="training steps (default: 4096; --emag: 1500)"
    )
    s.add_argument("--seed", type=int, default=0, help="random seed of data, model and training")
    s.add_argument(
        "--emag",
        action="store_true",
        help="instead: EMAG guidance on a digits diffusion transformer (docs/guidance.md)",
    )
    s.set_defaults(func=cmd_demo)
    return p


class _Quiet:
    """A standard stream that goes quiet once its terminal is gone (the window closed while
    SIGHUP is ignored, a disowned job: every write fails with EIO), so the command still
    finishes its work and says so by its exit status."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _gone(self, e: OSError) -> None:
        if e.errno != errno.EIO:
            raise e
        # What is buffered and all that follows goes to /dev/null, the last flush included.
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._gone(e)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._gone(e)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `phema` and `python -m phema`."""
    # A standard stream closed before phema started (`2>&-`) is None in Python: its messages
    # go nowhere rather than failing the command at the first one.
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (lives as long as the process)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Quiet(sys.stdout), _Quiet(sys.stderr)
    try:
        return _run(argv)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BrokenPipeError:  # the reader left before the last flush
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        sys.stdout, sys.stderr = streams


def _run(argv: Sequence[str] | None) -> int:
    """main() once its standard streams are set up."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`phema inspect S | head`): end quietly, as `cat` does. Standard
        # output points at /dev/null so that the interpreter's last flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UserCodeError as e:
        import traceback

        traceback.print_exception(e.__cause__ or e)
        print(f"phema {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (PhemaError, OSError) as e:
        # One line naming the value or file at fault; anything else is a bug and shows its
        # traceback.
        print(f"phema {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"phema {args.command}: interrupted", file=sys.stderr)
        return 130
