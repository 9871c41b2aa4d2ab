"""How an index is built: one typed object, from defaults, a TOML file and ``CATALENS_*`` variables.

``IndexConfig`` is build-time configuration, stored with the index so later runs build it the
same way. How searches run is ``catalens.search.settings.SearchSettings``, kept apart: it
never freezes into the index.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)

from catalens.errors import InputError
from catalens.indexer.features import FeatureSpec, feature_spec, list_features


class ConfigError(InputError, ValueError):
    """A configuration value that cannot be used; the message names the field and its source."""


def _registered(names: Collection[str] | None = None) -> list[FeatureSpec]:
    """The registered features among ``names`` (all of them: None); unknown names are left to the
    checks that report them (``check_buildable``)."""
    known = list_features()
    return [feature_spec(name) for name in known if names is None or name in names]


class IndexConfig(BaseModel):
    """How an index is built. Stored with the index, so later runs build it the same way."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backbone: str = "efficientnet_lite0"
    # How pixels are scaled for the backbone: auto (as its weights were trained), imagenet or
    # symmetric ([-1, 1]). Indexes from before this setting used imagenet and keep it.
    input_scaling: Literal["auto", "imagenet", "symmetric"] = "auto"
    # The features every image gets (indexer/features/: one module each). Features fitted on
    # the catalog (ae, deep_ft, ...) join the list when their model is trained.
    # From a variable: CATALENS_FEATURES=deep,colour,sift (or a JSON list).
    features: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["deep", "colour", "sift"])
    # Per-feature settings, e.g. {"sift": {"max_keypoints": 400}}; each feature checks its own.
    feature_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # faiss index_factory string: "Flat" is exact, right up to ~30k items on one machine; for larger
    # catalogs see catalens.indexer.stores.faiss_vectors.recommended_factory (HNSW32, then IVF-PQ).
    faiss_factory: str = "Flat"
    # faiss.ParameterSpace string applied whenever the index is opened ("nprobe=32,k_factor_rf=4");
    # "auto" is catalens.indexer.stores.faiss_vectors.recommended_search_parameters(faiss_factory).
    faiss_search_params: str = "auto"
    runtime: Literal["auto", "openvino", "torch"] = "auto"
    batch_size: int = Field(16, ge=1)
    # Decode processes (decoding, resizing, keypoints), one a core up to four: the network in the
    # main process waits on them (docs/speed.md).
    num_workers: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)), ge=0)
    max_pixels: int = Field(80_000_000, ge=1)
    # How many images between durable commits of an indexing run (what a crash can cost).
    commit_every: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _written_options(self) -> IndexConfig:
        # Each feature's ``written_options`` go into the configuration (in place, so they do not
        # count as settings given for a run), so the index keeps them; stored configurations
        # without them get the feature's ``stored_options`` (``from_json``).
        for spec in _registered(self.features):
            if spec.written_options:
                options = self.feature_options.setdefault(spec.name, {})
                for key, value in spec.written_options.items():
                    options.setdefault(key, value)
        return self

    @field_validator("features", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.lstrip().startswith("[") else \
                [part.strip() for part in value.split(",") if part.strip()]
        return value

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IndexConfig:
        """A stored configuration, including those written by older catalens versions."""
        data = dict(data)
        features = list(data.get("features") or ["deep", "colour", "sift"])
        # Before features were listed, switches and an untyped "extra" table said the same.
        extra = data.pop("extra", None) or {}
        for spec in _registered():
            if spec.legacy_switch and data.pop(spec.legacy_switch, True) is False:
                features = [name for name in features if name != spec.name]
            if spec.legacy_options and spec.legacy_options in extra:
                data.setdefault("feature_options", {}).setdefault(spec.name, dict(extra[spec.legacy_options]))
        data["features"] = features
        data.setdefault("input_scaling", "imagenet")
        for spec in _registered(features):  # built before these options were written down
            if spec.stored_options:
                options = data.setdefault("feature_options", {})
                options[spec.name] = {**spec.stored_options, **options.get(spec.name, {})}
        known = set(cls.model_fields)
        return cls(**{key: value for key, value in data.items() if key in known})


M = TypeVar("M", bound=BaseModel)
# The tables of a configuration file: how an index is built, and how searches run.
TABLES = ("index", "search")


def _validated(model: type[BaseModel], values: dict[str, Any], source: str, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``values``, checked now so that an error names ``source``."""
    merged = {**base, **values}
    try:
        model(**merged)
    except ValidationError as error:
        problems = "; ".join(
            _problem(model, issue) for issue in error.errors() if not issue["loc"] or issue["loc"][0] in values
        ) or str(error)
        raise ConfigError(f"{source}: {problems}") from None
    return merged


def _problem(model: type[BaseModel], issue: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in issue["loc"]) or "value"
    if issue["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(issue["loc"][-1]), list(model.model_fields), n=1)
        return f"{where}: unknown setting" + (f" (did you mean {close[0]}?)" if close else "")
    return f"{where}: {issue['msg']} (got {issue['input']!r})"


def read_toml_table(path: str | Path, table: str) -> dict[str, Any]:
    """The ``[table]`` of a TOML configuration file, with errors that name the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    unknown = sorted(set(document) - set(TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown table{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(f'[{name}]' for name in unknown)}; the tables are [index] and [search]")
    values = document.get(table, {})
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: [{table}] must be a table")
    return values


def environment_values(model: type[BaseModel], env_prefix: str) -> dict[str, dict[str, Any]]:
    """The ``<env_prefix><FIELD>`` variables set for ``model``'s fields, decoded by pydantic-settings
    (JSON for lists and tables unless a field says ``NoDecode``), each as ``{field: value}`` under
    its variable's name so that a bad one is reported by name."""
    fields = {name: (info.annotation, info) for name, info in model.model_fields.items()}
    settings = create_model(f"{model.__name__}Variables", __base__=BaseSettings, **fields)
    settings.model_config = SettingsConfigDict(env_prefix=env_prefix, extra="ignore")
    try:
        found = EnvSettingsSource(settings, env_prefix=env_prefix)()
    except SettingsError as error:  # a variable pydantic-settings could not decode; it names the field
        raise ConfigError(f"{env_prefix}* variables: {error}") from None
    return {f"{env_prefix}{name.upper()}": {name: value} for name, value in found.items()}


def load_layered(model: type[M], table: str, env_prefix: str, path: str | Path | None = None, **overrides: Any) -> M:
    """``model`` from its defaults, then table ``[table]`` of ``path`` (or ``$CATALENS_CONFIG``), then
    ``<env_prefix><FIELD>`` variables, then ``overrides`` (None values ignored).

    Each layer is checked on its own, so a typo or a bad value is reported with where it came
    from (``ConfigError``).
    """
    values: dict[str, Any] = {}
    path = path or os.environ.get("CATALENS_CONFIG")
    if path:
        values = _validated(model, read_toml_table(path, table), f"{path} [{table}]", values)
    for variable, value in environment_values(model, env_prefix).items():
        values = _validated(model, value, variable, values)
    given = {key: value for key, value in overrides.items() if value is not None}
    return model(**_validated(model, given, "arguments", values))


def legacy_feature_switches() -> dict[str, str]:
    """``CATALENS_<SWITCH>`` variable -> feature, of each feature's ``legacy_switch``: from before
    ``features`` was a list (``from_json`` reads their stored form), still honoured, since scripts
    and the issue tracker use them, and ignoring one silently indexed every feature for a user who
    asked for fewer."""
    return {f"CATALENS_{spec.legacy_switch.upper()}": spec.name for spec in _registered() if spec.legacy_switch}


def _switched_off(variable: str) -> bool:
    text = os.environ.get(variable)
    if text is None:
        return False
    try:
        return not TypeAdapter(bool).validate_python(text.strip())
    except ValidationError:
        raise ConfigError(f"{variable}={text!r}: expected true or false") from None


def load_config(path: str | Path | None = None, **overrides: Any) -> IndexConfig:
    """Defaults, then ``path`` (or ``$CATALENS_CONFIG``) table ``[index]``, then ``CATALENS_<FIELD>``, then overrides.

    A feature's legacy switch set false (``legacy_feature_switches``: ``CATALENS_LOCAL_FEATURES=false``)
    drops it from the features, unless the arguments list the features themselves.
    """
    config = load_layered(IndexConfig, "index", "CATALENS_", path, **overrides)
    dropped = {feature for variable, feature in legacy_feature_switches().items() if _switched_off(variable)}
    if dropped and overrides.get("features") is None:
        # Given as the list the switches stand for, so it counts as set explicitly.
        features = [name for name in config.features if name not in dropped]
        config = load_layered(IndexConfig, "index", "CATALENS_", path, **{**overrides, "features": features})
    return config


# What an existing index does with a setting given explicitly for a run (``model_fields_set``):
# its stored rows were computed with these, so they cannot change...
FIXED_FIELDS = ("backbone", "input_scaling", "feature_options")
# ...its FAISS files are derived from the stored rows, so these are applied by rebuilding them...
REBUILT_FIELDS = ("faiss_factory", "faiss_search_params")
# ...and these only say how runs work.
RUN_FIELDS = ("runtime", "batch_size", "num_workers", "max_pixels", "commit_every")


def settle(stored: IndexConfig, given: IndexConfig, fitted: Collection[str] = (),
           faiss: bool = True) -> tuple[IndexConfig, list[str]]:
    """The configuration an existing index (built with ``stored``) runs with when ``given`` was
    asked for, and one sentence per setting of ``given`` that changes something.

    Only the fields set explicitly on ``given`` (a file, a variable, an argument) count. A
    setting the index's rows depend on (the backbone, the input scaling, a feature's options)
    cannot change: ``ConfigError``. Features may be added (their rows are extracted on this
    run), not dropped; features fitted on the catalog (``fitted``: ae, deep_ft...) are kept,
    whatever ``given`` lists. FAISS and run settings replace the stored ones (an index without
    FAISS files, ``faiss=False``, says it ignores the FAISS ones).
    """
    explicit = given.model_fields_set
    refused = []
    for name in FIXED_FIELDS:
        if name in explicit and getattr(given, name) != getattr(stored, name):
            if name == "feature_options":
                changed = sorted(feature for feature in {*given.feature_options, *stored.feature_options}
                                 if feature in stored.features
                                 and given.feature_options.get(feature, {}) != stored.feature_options.get(feature, {}))
                if not changed:
                    continue
                refused.append(f"the options of {', '.join(changed)} (it has {stored.feature_options or {}!r})")
            else:
                refused.append(f"{name} (it has {getattr(stored, name)!r}, not {getattr(given, name)!r})")
    added: list[str] = []
    if "features" in explicit:
        dropped = [name for name in stored.features if name not in given.features and name not in fitted]
        if dropped:
            refused.append(f"features (it has {', '.join(dropped)}, which the given list drops)")
        added = [name for name in given.features if name not in stored.features]
    if refused:
        raise ConfigError(f"an existing index cannot change {'; '.join(refused)}: "
                          "index into a new location, or leave these settings out")
    settled = stored.model_copy(deep=True)
    notes = []
    if added:
        settled.features = [*stored.features, *added]
        settled.feature_options = {**stored.feature_options,
                                   **{name: given.feature_options[name] for name in added if name in given.feature_options}}
        notes.append(f"features: {', '.join(added)} added; every item is extracted again on this run to get "
                     f"{'it' if len(added) == 1 else 'them'}")
    for name in REBUILT_FIELDS + RUN_FIELDS:
        value, before = getattr(given, name), getattr(stored, name)
        if name not in explicit or value == before:
            continue
        if name in REBUILT_FIELDS and not faiss:
            notes.append(f"{name} {value!r} is ignored: this index keeps no FAISS files")
            continue
        setattr(settled, name, value)
        if name == "faiss_factory":
            notes.append(f"faiss_factory {value!r} replaces {before!r}: the FAISS files are rebuilt from the stored vectors")
        elif name == "faiss_search_params":
            notes.append(f"faiss_search_params {value!r} replaces {before!r}: searches use it from now on")
        else:
            notes.append(f"{name} {value!r} replaces {before!r}, from this run on")
    return settled, notes
