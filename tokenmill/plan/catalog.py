"""Loads the planner's data files: hardware.yaml, models.yaml, efficiency.yaml.

Lookups by id raise `UnknownIdError`, whose message lists every valid id, so the CLI can print
one line and exit. `local` (this machine) is measured at run time, not read from the package.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tokenmill.plan.efficiency import Efficiency
from tokenmill.plan.hardware import Hardware, Price, Reference
from tokenmill.plan.model_spec import ModelSpec, from_gguf, from_hf_config_file

LOCAL_ID = "local"


class UnknownIdError(ValueError):
    """An id that is not in a catalog. str() is one line naming the valid ids."""

    def __init__(self, what: str, given: str, valid: list[str]) -> None:
        self.what, self.given, self.valid = what, given, valid
        super().__init__(f"unknown {what} {given!r}; valid {what} ids: {', '.join(valid)}")


def _load(name: str) -> dict[str, Any]:
    text = resources.files("tokenmill.plan").joinpath(name).read_text()
    return yaml.safe_load(text)


@cache
def references() -> dict[str, Reference]:
    raw = _load("hardware.yaml")["references"]
    return {
        k: Reference(key=k, title=v["title"], url=v["url"], date=str(v["date"]))
        for k, v in raw.items()
    }


@cache
def _hardware_table() -> dict[str, Hardware]:
    refs = references()
    table: dict[str, Hardware] = {}
    for hid, raw in _load("hardware.yaml")["chips"].items():
        price = raw.get("price")
        sources = dict(raw.get("sources", {}))
        for ref in [*sources.values(), *([price["source"]] if price else [])]:
            if ref not in refs:
                raise ValueError(f"hardware.yaml: {hid} cites unknown reference {ref!r}")
        table[hid] = Hardware(
            id=hid,
            name=raw["name"],
            kind=raw["kind"],
            family=raw["family"],
            memory_gb=float(raw["memory_gb"]),
            memory_gbs=float(raw["memory_gbs"]),
            tflops={k: float(v) for k, v in raw["tflops"].items()},
            interconnect_gbs=float(raw.get("interconnect_gbs") or 0.0),
            interconnect_latency_us=raw.get("interconnect_latency_us"),
            tp_domain=int(raw.get("tp_domain", 1)),
            power_w=raw.get("power_w"),
            price=Price(**price) if price else None,
            sources=sources,
            notes=raw.get("notes", ""),
        )
    return table


def hardware_ids() -> list[str]:
    return [*_hardware_table(), LOCAL_ID]


def hardware(hid: str) -> Hardware:
    """The chip `hid`; `local` measures this machine (cached in the user cache dir)."""
    if hid == LOCAL_ID:
        from tokenmill.plan.local import local_hardware

        return local_hardware()
    table = _hardware_table()
    if hid not in table:
        raise UnknownIdError("hardware", hid, hardware_ids())
    return table[hid]


@cache
def _model_table() -> dict[str, ModelSpec]:
    table = {}
    for mid, raw in _load("models.yaml")["models"].items():
        table[mid] = ModelSpec(
            name=mid,
            layers=raw["layers"],
            hidden=raw["hidden"],
            heads=raw["heads"],
            kv_heads=raw["kv_heads"],
            ffn=raw["ffn"],
            vocab=raw["vocab"],
            tied=raw["tied"],
            experts=raw.get("experts", 1),
            active_experts=raw.get("active_experts", 1),
            context=raw["context"],
            head_dim_override=raw.get("head_dim"),
            source=f"{raw['source']} ({raw['date']})",
        )
    return table


def model_ids() -> list[str]:
    return list(_model_table())


def model(ref: str) -> ModelSpec:
    """A catalog id, a .gguf file, or a Hugging Face config.json (or the directory holding it)."""
    table = _model_table()
    if ref in table:
        return table[ref]
    path = Path(ref)
    if path.suffix == ".gguf" and path.is_file():
        return from_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return from_hf_config_file(path / "config.json")
    if path.name == "config.json" and path.is_file():
        return from_hf_config_file(path)
    raise UnknownIdError("model", ref, [*table, "<file.gguf>", "<dir with config.json>"])


@cache
def _efficiency_table() -> dict[str, Efficiency]:
    table = {}
    for family, raw in _load("efficiency.yaml")["families"].items():
        table[family] = Efficiency(
            family=family,
            bandwidth={int(k): float(v) for k, v in raw["bandwidth"].items()},
            compute=float(raw["compute"]),
            link=float(raw.get("link", 0.7)),
            collective_overhead_us=float(raw.get("collective_overhead_us", 0.0)),
            expert_bandwidth=float(raw.get("expert_bandwidth", 1.0)),
            step_overhead_us=float(raw.get("step_overhead_us", 0.0)),
            layer_overhead_us=float(raw.get("layer_overhead_us", 0.0)),
            memory_usable=float(raw.get("memory_usable", 0.9)),
            fitted_on=tuple(raw.get("fitted_on", [])),
            fit_params=tuple(raw.get("fit", [])),
            derived_from=raw.get("derived_from", ""),
            notes=raw.get("notes", ""),
        )
    return table


def efficiency(family: str) -> Efficiency:
    table = _efficiency_table()
    if family not in table:
        raise UnknownIdError("efficiency family", family, list(table))
    return table[family]
