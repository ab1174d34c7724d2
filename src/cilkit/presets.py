"""Config files, packaged presets and layers: where a configuration comes from, before it is checked.

A config is resolved from layers, later ones winning: the built-in defaults, the dataset's profile
(:data:`cilkit.config.DATASET_PROFILES`: backbone, augmentation, schedule and scenario that suit
it), a YAML file or packaged preset (``extends:`` starts from another), and the command line.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from cilkit.config import DATASET_ALIASES, DATASET_PROFILES, ONLINE_PROFILE, DataConfig
from cilkit.errors import ConfigError
from cilkit.schema import deep_merge


def merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``; ``method_args`` mappings merge one level (a method's arguments are flat)."""
    return deep_merge(base, override, shallow=("method_args",))


def set_dotted(data: dict, assignment: str) -> dict:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict, in place."""
    if "=" not in assignment:
        raise ConfigError(assignment, "--set takes key=value, e.g. --set train.lr=0.05")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{part}' is not a section")
    node[parts[-1]] = value
    return data


def preset_names() -> list[str]:
    """Packaged presets, named by their path under ``cilkit/configs`` without ``.yaml``."""
    root = resources.files("cilkit") / "configs"
    names: list[str] = []

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml") and not child.name.startswith("_"):
                names.append(prefix + child.name[: -len(".yaml")])

    walk(root, "")
    return sorted(names)


def _preset_path(spec: str):
    return resources.files("cilkit") / "configs" / (spec if spec.endswith(".yaml") else spec + ".yaml")


def load_yaml(spec: str, _seen: tuple = ()) -> dict:
    """A config file, or a packaged preset such as ``protocols/fmnist/replay``.

    A file may start from another with ``extends: <file or preset>`` (a path relative to the file,
    or a preset name); its own keys are merged over the other's.
    """
    path = Path(spec)
    if path.is_file():
        try:
            text, base_dir = path.read_text(encoding="utf-8"), path.parent
        except UnicodeDecodeError:
            raise ConfigError("--config", f"'{spec}' is not a text file (a YAML config is UTF-8 text)") from None
    else:
        packaged = _preset_path(spec)
        if not packaged.is_file():
            raise ConfigError("--config", f"'{spec}' is neither a file nor a preset; presets: {', '.join(preset_names())}")
        text, base_dir = packaged.read_text(), None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"'{spec}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"'{spec}' must hold a mapping of config keys")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if spec in _seen:
        raise ConfigError("extends", f"'{spec}' extends itself through {' -> '.join(_seen)}")
    if base_dir is not None and (base_dir / parent).is_file():
        parent_spec = str(base_dir / parent)
    elif base_dir is None and not _preset_path(parent).is_file():  # relative to the preset's folder
        parent_spec = str(Path(spec).parent / parent).replace("\\", "/")
    else:
        parent_spec = parent
    return merge(load_yaml(parent_spec, _seen + (spec,)), data)


def merge_layers(layers: list[dict]) -> tuple[dict, dict]:
    """The user's layers merged in order, over the dataset's profile (and the online setting's defaults
    when ``scenario.mode`` is online): ``(merged, user_only)``."""
    user: dict = {}
    for layer in layers:
        user = merge(user, layer)
    dataset = (user.get("data") or {}).get("dataset", DataConfig.dataset)
    if isinstance(dataset, str):
        dataset = DATASET_ALIASES.get(dataset, dataset)
        user = merge(user, {"data": {"dataset": dataset}})
    profile = DATASET_PROFILES.get(dataset, {})
    if (user.get("scenario") or {}).get("mode") == "online":
        profile = merge(profile, ONLINE_PROFILE)
    return merge(profile, user), user
