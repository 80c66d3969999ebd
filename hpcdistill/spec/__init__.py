"""TOML experiment specs: loading, validation, inheritance (`extends`), overrides and sweeps."""

from hpcdistill.spec.load import LoadedSpec, load_spec, parse_override, spec_to_dict
from hpcdistill.spec.schema import BUNDLED_MODEL, Spec
from hpcdistill.spec.sweep import Run, expand, run_id_for

__all__ = ["BUNDLED_MODEL", "LoadedSpec", "Run", "Spec", "expand", "load_spec", "parse_override",
           "run_id_for", "spec_to_dict"]
