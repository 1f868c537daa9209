"""Triton's own benchmark client, ``perf_analyzer``, as an independent witness of ``triton-vlm bench``.

``perf_analyzer`` ships inside the tritonclient 2.51 wheel (``tritonclient-2.51.0.data/data/bin/``; later wheels
dropped it). It needs ``libb64.so.0d`` and ``libcudart.so.12``, which the nvidia-pytriton wheel bundles under
hashed names in ``nvidia_pytriton.libs``: :func:`library_dir` links them under their plain names.

The requests are the served benchmark's (:class:`~triton_vlm.bench.workload.Workload`): distinct PNG images as the
``image`` UINT8 tensor, the same prompt, ``max_tokens`` and ``ignore_eos`` so every answer is exactly
``max_tokens`` long. Throughput in tokens is then ``infer/s x max_tokens``.

    python -m triton_vlm.bench.perf_analyzer --url 127.0.0.1:8001 --model llava --concurrency 1,64 --json pa.json
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from triton_vlm.bench.workload import Workload

#: The last tritonclient wheel that carries the binary.
WHEEL_VERSION = "2.51.0"
_WHEEL_MEMBER = f"tritonclient-{WHEEL_VERSION}.data/data/bin/perf_analyzer"
#: The two libraries the binary links against, as (plain name, prefix of the wheel's hashed name).
_LIBRARIES = (("libb64.so.0d", "libb64-"), ("libcudart.so.12", "libcudart-"))


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing or failed; the message says what to do."""


@dataclass(frozen=True)
class PerfAnalyzerResult:
    concurrency: int
    requests: int
    infer_s: float
    output_tok_s: float
    latency_p50_s: float
    latency_p99_s: float
    max_tokens: int
    command: str

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def find_binary(wheel: Path | None = None) -> Path:
    """``$TRITON_VLM_PERF_ANALYZER``, ``perf_analyzer`` on PATH or beside this interpreter, else the binary
    extracted from ``wheel`` (a tritonclient 2.51 wheel) into a cache directory."""
    explicit = os.environ.get("TRITON_VLM_PERF_ANALYZER")
    if explicit:
        return Path(explicit)
    for candidate in (Path(sys.executable).parent / "perf_analyzer", shutil.which("perf_analyzer")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if wheel is None:
        raise PerfAnalyzerError(
            f"perf_analyzer not found: `make install` puts it in .venv/bin, or pass the tritonclient {WHEEL_VERSION} "
            f"wheel (pip download --no-deps tritonclient=={WHEEL_VERSION}) with --wheel, or set "
            "TRITON_VLM_PERF_ANALYZER")
    return extract_binary(wheel, Path(tempfile.gettempdir()) / "triton-vlm-perf-analyzer")


def extract_binary(wheel: Path, directory: Path) -> Path:
    """Write the wheel's ``perf_analyzer`` into ``directory`` (once) and return its path."""
    target = directory / "perf_analyzer"
    if not target.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            try:
                data = archive.read(_WHEEL_MEMBER)
            except KeyError:
                raise PerfAnalyzerError(f"{wheel} has no {_WHEEL_MEMBER}: use the tritonclient {WHEEL_VERSION} "
                                        "wheel") from None
        partial = target.with_suffix(".part")
        partial.write_bytes(data)
        partial.chmod(0o755)
        partial.replace(target)
    return target


def library_dir(libs: Path, directory: Path) -> Path:
    """``directory`` with the plain-named links the binary loads, pointing into the wheel's hashed ``libs``."""
    directory.mkdir(parents=True, exist_ok=True)
    for plain, prefix in _LIBRARIES:
        matches = sorted(libs.glob(f"{prefix}*"))
        if not matches:
            raise PerfAnalyzerError(f"{libs} has no {prefix}* library (perf_analyzer needs {plain})")
        link = directory / plain
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(matches[0])
    return directory


def input_data(workload: Workload, count: int) -> dict[str, object]:
    """``--input-data`` JSON: ``count`` distinct requests of ``workload`` (perf_analyzer cycles through them)."""
    data = []
    for index in range(count):
        image = workload.image(index)
        data.append({
            "image": {"content": {"b64": base64.b64encode(image).decode()}, "shape": [len(image)]},
            "prompt": [workload.prompt],
            "max_tokens": [workload.max_tokens],
            "ignore_eos": [True],
        })
    return {"data": data}


def parse_report(path: Path) -> tuple[float, float, float]:
    """(infer/s, p50 and p99 latency in seconds) from perf_analyzer's ``-f`` CSV report (one concurrency)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise PerfAnalyzerError(f"perf_analyzer wrote no measurement to {path}")
    row = rows[-1]
    return (float(row["Inferences/Second"]), float(row["p50 latency"]) / 1e6, float(row["p99 latency"]) / 1e6)


def run(url: str, model: str, concurrency: int, requests: int, workload: Workload, *, binary: Path,
        libs: Path | None = None, work_dir: Path | None = None, timeout: float = 900.0) -> PerfAnalyzerResult:
    """Run perf_analyzer once over gRPC at ``concurrency`` for exactly ``requests`` requests."""
    work = work_dir or Path(tempfile.mkdtemp(prefix="triton-vlm-pa-"))
    inputs = work / "inputs.json"
    if not inputs.is_file():
        inputs.write_text(json.dumps(input_data(workload, min(requests, 64))))
    report = work / f"report-c{concurrency}.csv"
    command = [str(binary), "-m", model, "-u", url, "-i", "grpc", "--input-data", str(inputs),
               "--concurrency-range", f"{concurrency}:{concurrency}", "--request-count", str(requests),
               "--measurement-mode", "count_windows", "--measurement-request-count", str(requests),
               "-f", str(report)]
    env = dict(os.environ)
    if libs is not None:
        links = library_dir(libs, work / "libs")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(links), str(libs), env.get("LD_LIBRARY_PATH"))
                                                 if p)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise PerfAnalyzerError(f"perf_analyzer exited with {done.returncode}:\n{done.stdout[-2000:]}\n"
                                f"{done.stderr[-2000:]}")
    infer_s, p50, p99 = parse_report(report)
    return PerfAnalyzerResult(concurrency, requests, infer_s, infer_s * workload.max_tokens, p50, p99,
                              workload.max_tokens, " ".join(command))


def default_libs() -> Path | None:
    """The nvidia-pytriton wheel's bundled libraries, where the launcher finds them."""
    from triton_vlm.launcher.distribution import find_distribution

    try:
        return find_distribution().libs
    except Exception:  # noqa: BLE001 - perf_analyzer may still find them on LD_LIBRARY_PATH
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the server's gRPC address (host:8001)")
    parser.add_argument("--model", required=True, help="a non-decoupled model, e.g. llava")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--requests", default="8,192", help="requests per level (one number, or one per level)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--wheel", type=Path, default=None, help=f"a tritonclient {WHEEL_VERSION} wheel")
    parser.add_argument("--libs", type=Path, default=None, help="nvidia_pytriton.libs (default: the launcher's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    counts = counts * len(levels) if len(counts) == 1 else counts
    if len(counts) != len(levels):
        parser.error("--requests: give one number or one per concurrency level")
    binary = find_binary(args.wheel)
    libs = args.libs or default_libs()
    workload = Workload(model=args.model, image_size=args.image_size, max_tokens=args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="triton-vlm-pa-"))
    results = []
    for level, count in zip(levels, counts, strict=True):
        result = run(args.url, args.model, level, count, workload, binary=binary, libs=libs, work_dir=work)
        print(f"perf_analyzer {args.model} c{level}: {result.infer_s:.3f} infer/s = {result.output_tok_s:.1f} tok/s "
              f"(p50 {result.latency_p50_s:.3f} s, p99 {result.latency_p99_s:.3f} s)", flush=True)
        results.append(result.as_json())
    if args.json:
        args.json.write_text(json.dumps({"runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
