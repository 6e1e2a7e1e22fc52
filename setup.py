"""Installs the `sigma-moe` distribution: packages `sigma_moe` and `sigma_moe_kernels`.

The kernels' folder is named `sigma_moe_kernels/`, not `kernels/`: `kernels` is Hugging Face's
kernels library, and transformers imports it when it can find it. With a folder `kernels/` at the
repo root (on sys.path under `python -m` and pytest), transformers imported our folder a second
time as `kernels`, which re-defined every custom op and made torch free the first definitions,
still in use: the native crashes of CI on 2026-12-01 (tests/test_kernels_import.py).
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    dev_only = ("pytest", "ruff", "import-linter")
    return [
        ln.strip()
        for ln in lines
        if ln.strip() and not ln.startswith("#") and not ln.startswith(dev_only)
    ]


setup(
    name="sigma-moe",
    version="0.1.0",
    description="Pretraining very sparse fine-grained MoE language models with Rho-1 token selection",
    python_requires=">=3.10",
    packages=find_packages(include=["sigma_moe", "sigma_moe.*"]) + ["sigma_moe_kernels"],
    package_data={
        "sigma_moe": ["data/bundled/*", "data/bundled/**/*"],
        "sigma_moe_kernels": ["csrc/*.c"],  # compiled on first use (_cgemm.py)
    },
    include_package_data=True,
    install_requires=_requirements(),
    extras_require={"gpu": ["flash-attn>=2.6"], "dev": ["pytest>=8.0", "ruff>=0.6"]},
    entry_points={"console_scripts": ["sigma-moe=sigma_moe.cli:main"]},
)
