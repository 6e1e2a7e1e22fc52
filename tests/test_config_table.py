"""The README's config-key table is the one generated from the dataclasses in sigma_moe/config/."""

from pathlib import Path

from sigma_moe import config_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_table_is_current():
    text = README.read_text(encoding="utf-8")
    assert config_table.render_into(text) == text, (
        "README.md's config-key table is stale: run `python -m sigma_moe.config_table --write "
        "README.md`"
    )


def test_table_has_every_leaf_key_with_its_default():
    keys = {r[0]: r for r in config_table.rows()}
    for key, default in [("train.max_steps", "300"), ("rho1.mode", "none"),
                         ("data.mixing.kind", "static"), ("parallel.zero_stage", "1"),
                         ("data.domains[].clean", "false")]:  # fmt: skip
        assert keys[key][2] == default, keys[key]
    assert not set(config_table.DOC) - set(keys), "DOC describes keys that no longer exist"
    assert all(r[3] for r in keys.values()), [k for k, r in keys.items() if not r[3]]
