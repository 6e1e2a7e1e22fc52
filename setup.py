"""Installs the `sigma-moe` distribution: packages `sigma_moe` and `sigma_moe_kernels`.

`sigma_moe_kernels` lives in the folder `kernels/` (package_dir) so no top-level import package
is named `kernels` -- that name belongs to Hugging Face's `kernels` library, which transformers
imports.
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
    package_dir={"sigma_moe_kernels": "kernels"},
    package_data={"sigma_moe": ["data/bundled/*", "data/bundled/**/*"]},
    include_package_data=True,
    install_requires=_requirements(),
    extras_require={"gpu": ["flash-attn>=2.6"], "dev": ["pytest>=8.0", "ruff>=0.6"]},
    entry_points={"console_scripts": ["sigma-moe=sigma_moe.cli:main"]},
)
