"""``refattn info``: versions, importable array backends and the GPU."""

from __future__ import annotations

import json
import platform
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

import click

from refattn import __version__

_PACKAGES = (
    "numpy",
    "array-api-compat",
    "click",
    "safetensors",
    "array-api-strict",
    "cupy-cuda12x",
    "cupy-cuda13x",
    "torch",
    "matplotlib",
)


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def gather_info() -> dict[str, object]:
    """Everything ``refattn info`` prints, as a JSON-ready dict."""
    backends: dict[str, object] = {"numpy": True}
    for mod in ("array_api_strict", "cupy"):
        try:
            import_module(mod)
            backends[mod] = True
        except Exception:  # an import failure of an optional backend is information
            backends[mod] = False
    gpu: dict[str, object] = {"available": False}
    if backends["cupy"]:
        try:
            import cupy

            if cupy.is_available():
                props = cupy.cuda.runtime.getDeviceProperties(0)
                gpu = {
                    "available": True,
                    "name": props["name"].decode(),
                    "count": cupy.cuda.runtime.getDeviceCount(),
                }
        except Exception as err:
            gpu = {"available": False, "reason": " ".join(str(err).split())}
    else:
        gpu["reason"] = "cupy is not installed (pip install 'refattn[cuda13]')"
    kernels: object = []
    try:
        from refattn.cuda import kernel_names

        kernels = kernel_names()
    except ImportError:
        kernels = []
    return {
        "refattn": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _pkg_version(p) for p in _PACKAGES},
        "backends": backends,
        "gpu": gpu,
        "cuda_kernels": kernels,
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(as_json: bool) -> None:
    """Show versions, importable array backends and whether a GPU is visible."""
    data = gather_info()
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    click.echo(f"refattn {data['refattn']} (python {data['python']}, {data['platform']})")
    click.echo("packages:")
    for name, ver in data["packages"].items():  # type: ignore[union-attr]
        click.echo(f"  {name:<18} {ver or '-'}")
    backends = data["backends"]
    click.echo(
        "array backends: "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in backends.items())  # type: ignore[union-attr]
    )
    gpu = data["gpu"]
    if gpu.get("available"):  # type: ignore[union-attr]
        click.echo(f"gpu: {gpu['name']} ({gpu['count']} device(s))")  # type: ignore[index]
    else:
        click.echo(f"gpu: none ({gpu.get('reason', 'not visible')})")  # type: ignore[union-attr]
    kernels = data["cuda_kernels"]
    click.echo(f"cuda kernels: {', '.join(kernels) if kernels else '-'}")  # type: ignore[arg-type]
