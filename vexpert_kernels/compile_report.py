"""AOT compile report: compile every Triton kernel config of the package for sm_90a and sm_80, without a GPU.

    python -m vexpert_kernels.compile_report [--arch 90 80] [--markdown] [--json PATH] [--jobs N] [--module NAME]

Every module under :mod:`vexpert_kernels.ops` that exposes ``aot_compile_specs() -> list[CompileSpec]`` is
discovered (``pkgutil``). Each spec is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32), options={"num_warps", "num_stages"})`` for every requested compute capability listed in ``spec.targets``, and
the cubin is read back with the ``cuobjdump`` bundled in Triton (``--dump-resource-usage``). Reported per kernel and
config: registers, stack bytes (spills land there), local memory, shared memory (dynamic, as the launcher requests
it, and static), whether the PTX holds ``wgmma`` (sm_90a) / ``mma``, and whether TMA bulk-tensor copies
(``cp.async.bulk.tensor``) appear where ``spec.expects_tma`` says the kernel means to use them, and whether the
kernel is warp-specialised (``ws``: a ``ttg.warp_specialize`` op in the TTGIR, i.e. producer/consumer partitions with
``setmaxnreg``); a config that asks for it (a true ``WARP_SPEC`` constexpr) but lost it on sm_90 is a problem
(docs/warp_specialization.md: Triton 3.6/3.9 only split num_warps=4, non-flattened loops).

Why subprocesses: ``triton.compile`` cannot take an ``InterpretedFunction`` (what ``@triton.jit`` returns under
``TRITON_INTERPRET=1``, which the test-suite sets), so compiling happens in worker processes started with
``TRITON_INTERPRET=0``; they also let two cores compile in parallel. Works with Triton 3.6 and 3.9 (both take
``ASTSource(fn, signature={name: type | "constexpr"}, constexprs={name: value}, attrs={(i,): [["tt.divisibility",
16]]})``; constexpr keys are argument names, which ASTSource maps to indices itself).

Divisibility hints: the JIT specialises pointers (torch allocations are 256-byte aligned) and integers that are
multiples of 16; an AOT compile without hints would produce narrower loads than real runs. Pointers always get the
16-byte hint; integer arguments named in ``spec.extra["divisible_by_16"]`` (a list, or ``"all"``) get it too.

Exit status: 0 when every compile succeeded with no spill and TMA present where expected; 1 otherwise;
2 when Triton is missing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

DEFAULT_ARCHS = (90, 80)
OPS_PACKAGE = "vexpert_kernels.ops"


@dataclass
class CompileResult:
    module: str
    index: int
    name: str
    arch: int
    num_warps: int
    num_stages: int
    ok: bool = False
    error: Optional[str] = None
    registers: Optional[int] = None
    stack_bytes: Optional[int] = None
    local_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None         # dynamic shared memory the launch requests (metadata.shared)
    static_shared_bytes: Optional[int] = None  # from cuobjdump SHARED
    wgmma: Optional[bool] = None
    mma: Optional[bool] = None
    tma: Optional[bool] = None
    expects_tma: bool = False
    ws: Optional[bool] = None                  # TTGIR has ttg.warp_specialize (producer/consumer partitions)
    expects_ws: bool = False                   # the spec asks for it (constexpr WARP_SPEC true)
    compile_s: Optional[float] = None
    triton_version: Optional[str] = None
    # filled by compile_spec(..., sass=True) only: counts in the SASS and the warps the launch really uses
    # (a warp-specialised kernel runs 3 warpgroups whatever num_warps asked for)
    launch_warps: Optional[int] = None
    setmaxreg: Optional[int] = None           # USETMAXREG: warpgroups re-balancing registers (warp specialisation)
    hgmma: Optional[int] = None               # wgmma instructions
    utmaldg: Optional[int] = None             # TMA loads
    constexprs: dict = field(default_factory=dict)

    @property
    def spills(self) -> bool:
        return bool((self.stack_bytes or 0) > 0 or (self.local_bytes or 0) > 0)

    @property
    def tma_missing(self) -> bool:
        return bool(self.ok and self.expects_tma and self.arch >= 90 and not self.tma)

    @property
    def ws_missing(self) -> bool:
        return bool(self.ok and self.expects_ws and self.arch >= 90 and not self.ws)

    def problems(self) -> list:
        """What makes this config unacceptable on this target (empty when fine)."""
        out = []
        if not self.ok:
            out.append(f"compile error: {self.error}")
            return out
        if self.spills:
            out.append(f"spills: stack {self.stack_bytes} B, local {self.local_bytes} B, {self.registers} registers")
        if self.tma_missing:
            out.append("expects TMA but the PTX has no cp.async.bulk.tensor")
        if self.ws_missing:
            out.append("asks for warp specialisation (WARP_SPEC) but the TTGIR has no ttg.warp_specialize")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spills"] = self.spills
        d["problems"] = self.problems()
        return d


# ----------------------------------------------------------------------------------------------- discovery
def discover_modules(package: str = OPS_PACKAGE) -> list:
    """Names of the modules under ``package`` (recursively) that define ``aot_compile_specs``."""
    pkg = importlib.import_module(package)
    names = []
    for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
        try:
            mod = importlib.import_module(info.name)
        except Exception as exc:  # a broken op module must show up in the report, not vanish
            names.append((info.name, f"import failed: {exc!r}"))
            continue
        if callable(getattr(mod, "aot_compile_specs", None)):
            names.append((info.name, None))
    return names


def load_specs(module_name: str) -> list:
    mod = importlib.import_module(module_name)
    specs = list(mod.aot_compile_specs())
    from ._aot import CompileSpec
    for i, s in enumerate(specs):
        if not isinstance(s, CompileSpec):
            raise TypeError(f"{module_name}.aot_compile_specs()[{i}] must be a vexpert_kernels._aot.CompileSpec, "
                            f"got {type(s).__name__}")
    return specs


# ----------------------------------------------------------------------------------------------- compiling
def _cuobjdump_path() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_RES_RE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str, kernel_name: Optional[str] = None) -> dict:
    """Parse ``cuobjdump --dump-resource-usage`` output -> {registers, stack, shared, local} of one function."""
    found = {m.group(1): tuple(int(m.group(i)) for i in range(2, 6)) for m in _RES_RE.finditer(text)}
    if not found:
        raise ValueError(f"no function resource line in cuobjdump output: {text[:300]!r}")
    key = kernel_name if kernel_name in found else next(iter(found))
    reg, stack, shared, local = found[key]
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def ptx_features(ptx: str) -> dict:
    return {
        "wgmma": "wgmma.mma_async" in ptx,
        "mma": bool(re.search(r"\bmma\.sync\b", ptx)),
        "tma": "cp.async.bulk.tensor" in ptx,
    }


def ttgir_warp_specialized(ttgir: str) -> bool:
    """The compiled kernel was split into warp-specialised partitions (``ttg.warp_specialize`` op in the TTGIR; a
    dropped request leaves only the ``tt.warp_specialize`` loop attribute, or nothing)."""
    return bool(re.search(r"\bttg\.warp_specialize\s*\(", ttgir or ""))


def _full_signature(fn, spec) -> dict:
    """Signature in argument order, with constexprs filled in as "constexpr"; a missing argument names itself."""
    arg_names = list(getattr(fn, "arg_names", []) or spec.signature.keys())
    sig = {}
    for name in arg_names:
        if name in spec.constexprs:
            sig[name] = "constexpr"
        elif name in spec.signature:
            sig[name] = spec.signature[name]
        else:
            raise ValueError(f"spec {spec.name!r}: argument {name!r} of {getattr(fn, '__name__', fn)} has no type in "
                             "signature and no value in constexprs")
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(arg_names)
    if unknown:
        raise ValueError(f"spec {spec.name!r}: signature/constexprs name arguments the kernel lacks: {sorted(unknown)}")
    return sig


def compile_spec(spec, arch: int, module: str = "", index: int = 0, sass: bool = False) -> CompileResult:
    """Compile one spec for one compute capability (in this process; needs TRITON_INTERPRET off). ``sass``: also
    dump the SASS and count what the warp-specialisation tests check (launch warps, USETMAXREG, HGMMA, UTMALDG)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = CompileResult(module=module, index=index, name=spec.name, arch=arch, num_warps=spec.num_warps,
                        num_stages=spec.num_stages, expects_tma=bool(spec.expects_tma),
                        expects_ws=bool(spec.constexprs.get("WARP_SPEC", False)),
                        triton_version=triton.__version__,
                        constexprs={k: (v if isinstance(v, (int, float, bool, str)) or v is None else repr(v))
                                    for k, v in spec.constexprs.items()})
    t0 = time.perf_counter()
    try:
        fn = spec.fn
        if type(fn).__name__ == "InterpretedFunction":
            raise RuntimeError("kernel was created under TRITON_INTERPRET=1; compile in a process without it")
        sig = _full_signature(fn, spec)
        div16 = spec.extra.get("divisible_by_16", ()) if isinstance(spec.extra, dict) else ()
        attrs = {}
        for i, (name, ty) in enumerate(sig.items()):
            if ty.startswith("*") or (ty.startswith("i") and (div16 == "all" or name in div16)):
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ptx = kernel.asm["ptx"]
        cubin = kernel.asm["cubin"]
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(cubin)
            path = f.name
        try:
            out = subprocess.run([_cuobjdump_path(), "--dump-resource-usage", path], capture_output=True,
                                 text=True, timeout=120)
            if sass:
                code = subprocess.run([_cuobjdump_path(), "--dump-sass", path], capture_output=True, text=True,
                                      timeout=120, check=True).stdout
                res.launch_warps = int(kernel.metadata.num_warps)
                res.setmaxreg = len(re.findall(r"\bUSETMAXREG\b", code))
                res.hgmma, res.utmaldg = code.count("HGMMA"), code.count("UTMALDG")
        finally:
            os.unlink(path)
        if out.returncode != 0:
            raise RuntimeError(f"cuobjdump failed ({out.returncode}): {out.stderr.strip()[:300]}")
        usage = parse_resource_usage(out.stdout, getattr(kernel.metadata, "name", None))
        feats = ptx_features(ptx)
        res.registers, res.stack_bytes, res.local_bytes = usage["registers"], usage["stack"], usage["local"]
        res.static_shared_bytes = usage["shared"]
        res.shared_bytes = int(getattr(kernel.metadata, "shared", 0) or 0)
        res.wgmma, res.mma, res.tma = feats["wgmma"], feats["mma"], feats["tma"]
        res.ws = ttgir_warp_specialized(kernel.asm["ttgir"])
        res.ok = True
    except Exception as exc:  # report, never crash the whole report
        res.error = _short_error(exc)
    res.compile_s = round(time.perf_counter() - t0, 3)
    return res


def _short_error(exc: BaseException, limit: int = 600) -> str:
    """One line: for Triton's CompilationError keep the location and the message after the caret, not the source."""
    text = str(exc)
    lines = text.splitlines()
    carets = [i for i, ln in enumerate(lines) if ln.strip() == "^"]
    if carets:
        where = lines[0].strip() if lines and lines[0].startswith("at ") else ""
        code = lines[carets[-1] - 1].strip() if carets[-1] > 0 else ""
        text = f"{where} `{code[:120]}`: " + " ".join(lines[carets[-1] + 1:])
    msg = f"{type(exc).__name__}: " + " ".join(text.split())
    return msg if len(msg) <= limit else msg[:limit // 3] + " ... " + msg[-(2 * limit) // 3:]


def _worker_main(payload: dict) -> list:
    """Runs in a subprocess with TRITON_INTERPRET=0: compile the listed (module, index, arch) jobs."""
    for p in payload.get("sys_path", []):
        if p not in sys.path:
            sys.path.insert(0, p)
    cache = {}
    out = []
    for module, index, arch in payload["jobs"]:
        try:
            if module not in cache:
                cache[module] = load_specs(module)
            spec = cache[module][index]
        except Exception as exc:
            out.append(CompileResult(module=module, index=index, name=f"{module}[{index}]", arch=arch, num_warps=0,
                                     num_stages=0, error=f"loading specs failed: {exc!r}"[:600]).to_dict())
            continue
        out.append(compile_spec(spec, arch, module, index).to_dict())
    return out


def _result_from_dict(d: dict) -> CompileResult:
    d = {k: v for k, v in d.items() if k in CompileResult.__dataclass_fields__}
    return CompileResult(**d)


def _child_env() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's warning; the default we rely on
    # the package must be importable in the child even when run from a source checkout without install
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_jobs(jobs: list, *, n_procs: int = 2, sys_path: Iterable = (), timeout: float = 1800) -> list:
    """Compile ``jobs`` = [(module, index, arch), ...] in up to ``n_procs`` subprocesses; results in job order."""
    if not jobs:
        return []
    n_procs = max(1, min(n_procs, len(jobs)))
    # arch-major order, then round-robin: each worker gets a similar mix of (slower) sm_90a and sm_80 compiles
    ordered = sorted(jobs, key=lambda j: -j[2])
    chunks = [ordered[i::n_procs] for i in range(n_procs)]
    procs = []
    for chunk in chunks:
        payload = json.dumps({"jobs": chunk, "sys_path": [str(p) for p in sys_path]})
        p = subprocess.Popen([sys.executable, "-m", "vexpert_kernels.compile_report", "--_worker"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_child_env())
        procs.append((chunk, p, payload))
    by_job = {}
    for chunk, p, payload in procs:
        try:
            stdout, stderr = p.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        results = None
        if p.returncode == 0:
            for line in stdout.splitlines()[::-1]:
                if line.startswith("@@RESULTS@@"):
                    results = json.loads(line[len("@@RESULTS@@"):])
                    break
        if results is None:
            err = f"compile worker failed (exit {p.returncode}): {stderr.strip()[-600:]}"
            results = [CompileResult(module=m, index=i, name=f"{m}[{i}]", arch=a, num_warps=0, num_stages=0,
                                     error=err).to_dict() for m, i, a in chunk]
        for job, r in zip(chunk, results):
            by_job[tuple(job)] = _result_from_dict(r)
    return [by_job[tuple(j)] for j in jobs]


def plan_jobs(modules: Iterable[str], archs=DEFAULT_ARCHS) -> tuple:
    """Load specs in this process (names and targets only) -> (jobs, load_errors)."""
    jobs, errors = [], []
    for module in modules:
        try:
            specs = load_specs(module)
        except Exception as exc:
            errors.append(CompileResult(module=module, index=-1, name=module, arch=0, num_warps=0, num_stages=0,
                                        error=f"aot_compile_specs() failed: {exc!r}"[:600]))
            continue
        for i, spec in enumerate(specs):
            for arch in archs:
                if arch in tuple(spec.targets):
                    jobs.append((module, i, int(arch)))
    return jobs, errors


def build_report(modules: Optional[Iterable[str]] = None, archs=DEFAULT_ARCHS, n_procs: Optional[int] = None,
                 sys_path: Iterable = ()) -> list:
    """Compile every discovered spec for every requested arch it targets; returns CompileResults (errors included)."""
    errors = []
    if modules is None:
        modules = []
        for name, err in discover_modules():
            if err:
                errors.append(CompileResult(module=name, index=-1, name=name, arch=0, num_warps=0, num_stages=0,
                                            error=err))
            else:
                modules.append(name)
    for p in sys_path:
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    jobs, load_errors = plan_jobs(modules, archs)
    if n_procs is None:
        n_procs = min(2, os.cpu_count() or 1)
    return errors + load_errors + run_jobs(jobs, n_procs=n_procs, sys_path=sys_path)


# ----------------------------------------------------------------------------------------------- output
COLUMNS = ["kernel", "arch", "warps/stages", "regs", "stack B", "smem KiB", "wgmma", "mma", "TMA", "ws", "status"]


def _row(r: CompileResult) -> list:
    yn = lambda v: "-" if v is None else ("yes" if v else "no")  # noqa: E731
    tma = yn(r.tma) + (" (expected)" if r.expects_tma and r.arch >= 90 else "")
    ws = yn(r.ws) + (" (expected)" if r.expects_ws and r.arch >= 90 else "")
    arch = f"sm_{r.arch}{'a' if r.arch == 90 else ''}" if r.arch else "-"
    status = "ok" if not r.problems() else "; ".join(r.problems())
    smem = "-" if r.shared_bytes is None else f"{(r.shared_bytes + (r.static_shared_bytes or 0)) / 1024:.1f}"
    return [r.name, arch, f"{r.num_warps}/{r.num_stages}", "-" if r.registers is None else str(r.registers),
            "-" if r.stack_bytes is None else str(r.stack_bytes), smem, yn(r.wgmma), yn(r.mma), tma, ws, status]


def format_markdown(results: list, triton_version: Optional[str] = None) -> str:
    lines = []
    if triton_version:
        lines.append(f"Triton {triton_version}; {len(results)} compiles; "
                     f"{sum(1 for r in results if r.problems())} with problems.\n")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for r in results:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _row(r)) + " |")
    return "\n".join(lines) + "\n"


def format_text(results: list) -> str:
    rows = [COLUMNS] + [_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    out = []
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vexpert_kernels.compile_report", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities (90 80)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default min(2, cpus))")
    ap.add_argument("--module", action="append", help="only these modules (default: discover vexpert_kernels.ops)")
    ap.add_argument("--path", action="append", default=[], help="extra sys.path entry for --module (repeatable)")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        results = _worker_main(json.loads(sys.stdin.read()))
        sys.stdout.write("\n@@RESULTS@@" + json.dumps(results) + "\n")
        return 0
    try:
        import triton
    except Exception as exc:
        print(f"compile_report needs Triton: {exc!r}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = build_report(args.module, tuple(args.arch), args.jobs, sys_path=args.path)
    if args.markdown:
        print(format_markdown(results, triton.__version__), end="")
    else:
        print(format_text(results), end="")
    bad = [r for r in results if r.problems()]
    print(f"\n{len(results)} compiles with Triton {triton.__version__} in {time.perf_counter() - t0:.1f}s; "
          f"{len(bad)} with problems", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "archs": list(args.arch),
                       "results": [r.to_dict() for r in results]}, f, indent=1)
    if not results:
        print("no kernel exposes aot_compile_specs() yet", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
