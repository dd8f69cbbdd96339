"""The Hugging Face Hub, through huggingface_hub only: adapter repositories read from its cache, folders uploaded.

An adapter is named by a local directory or by a hub repository id (``owner/name``), as in PEFT. A directory that
exists wins; anything else that is a valid repository id is fetched with ``huggingface_hub.snapshot_download``
into huggingface_hub's own cache (``HF_HUB_CACHE`` or ``cache_dir``), which also gives ``revision`` (a branch, tag
or commit), ``token`` (private repositories) and offline mode (``HF_HUB_OFFLINE=1``: the cached snapshot, no
network) their usual meaning. Only the adapter files of either format are fetched, never a whole model repository.

Uploading creates the repository if needed (``HfApi.create_repo``) and commits one folder
(``HfApi.upload_folder``) with a model card (`model_card`): the hub's YAML metadata (base model, library, tags,
pipeline, through huggingface_hub's ``ModelCardData``), what the repository holds and how to load it, with
softprompt and with PEFT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
from huggingface_hub import CommitInfo, HfApi, ModelCardData, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from torch import nn

from softprompt.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from softprompt.files import AdapterFormatError
from softprompt.methods import method_of
from softprompt.peft_format import PEFT_WEIGHTS_FILE
from softprompt.version import __version__

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, PEFT_WEIGHTS_FILE)
"""The files fetched from an adapter repository: the config both formats name ``adapter_config.json``, and either
format's weights."""


@dataclass(frozen=True)
class HubOptions:
    """Where and how an adapter named by a hub id is fetched (PEFT's and huggingface_hub's names)."""

    revision: str | None = None
    """A branch, tag or commit of the adapter repository; None: ``main``."""
    token: str | bool | None = None
    """A hub token for private or gated repositories; None: the one ``hf auth login`` stored, if any."""
    cache_dir: str | os.PathLike[str] | None = None
    """huggingface_hub's cache folder; None: ``HF_HUB_CACHE`` (``~/.cache/huggingface/hub``)."""
    subfolder: str | None = None
    """The adapter's folder inside the directory or repository (PEFT saves every adapter but ``default`` in a
    subfolder of its name); None: the top."""
    local_files_only: bool = False
    """Use the cache only, as with ``HF_HUB_OFFLINE=1``, for this call alone."""


def is_repository_id(name: str) -> bool:
    """Whether `name` is a valid hub repository id (``name`` or ``owner/name``), by huggingface_hub's own rule."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def adapter_directory(name_or_path: str | os.PathLike[str], options: HubOptions = HubOptions()) -> Path:
    """The local directory of an adapter: `name_or_path` itself, or its hub snapshot in huggingface_hub's cache.

    Args:
        name_or_path: a directory, or a hub repository id.
        options: revision, token, cache folder, subfolder, cache only.

    Returns:
        The directory that holds ``adapter_config.json`` (which is not checked here).

    Raises:
        AdapterFormatError: not a directory and not a valid repository id; no such repository or revision; the
            hub cannot be reached (or offline mode is on) and the cache has no snapshot of it. Each message says
            what to do.
    """
    name = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else name_or_path
    if not isinstance(name, str) or not name.strip():
        raise AdapterFormatError(
            f"model_id={name_or_path!r}: expected an adapter directory or a hub repository id ('owner/name'). Fix: "
            "pass the directory save_pretrained wrote (use '.' for the current folder), or a hub id."
        )
    subfolder = check_subfolder(options.subfolder)
    check_revision(options.revision)
    root = Path(name)
    if root.is_file() and root.name in ADAPTER_FILES:
        raise AdapterFormatError(
            f"{root}: a file of an adapter: expected the adapter's directory. Fix: pass {str(root.parent)!r}, the "
            "folder that holds it."
        )
    local = root / subfolder if subfolder else root
    if local.is_dir():
        if not (local / CONFIG_FILE).is_file() and not _holds_adapters(local) and _cached(name, subfolder, options):
            raise AdapterFormatError(
                f"{local}: a local folder without an adapter hides the hub repository {name!r} of the same name, "
                "which huggingface_hub's cache holds. Fix: run from another folder (or rename the folder) to load the "
                "hub repository, or point to the adapter's own directory."
            )
        return local
    if not is_repository_id(name):
        raise AdapterFormatError(
            f"{local}: adapter directory not found (and {name!r} is no hub repository id either). Fix: pass the "
            "directory save_pretrained wrote, or a hub id 'owner/name'."
        )
    prefix = f"{subfolder}/" if subfolder else ""
    revision = options.revision or "main"
    where = f"{name!r} (revision {revision!r}{', subfolder ' + repr(options.subfolder) if options.subfolder else ''})"
    try:
        snapshot = snapshot_download(
            name,
            revision=options.revision,
            token=options.token,
            cache_dir=options.cache_dir,
            # Offline, only the cache can answer: said outright, a commit revision is looked up there too (1.x
            # releases of huggingface_hub otherwise ask the network for that commit's file list, and fail).
            local_files_only=options.local_files_only or huggingface_hub.constants.is_offline_mode(),
            allow_patterns=[prefix + file for file in ADAPTER_FILES],
        )
    except RevisionNotFoundError:
        raise AdapterFormatError(
            f"{where}: the hub has no such revision. Fix: pass an existing branch, tag or commit as revision=."
        ) from None
    except RepositoryNotFoundError:
        raise AdapterFormatError(
            f"{where}: no local directory of that name, and no hub repository either (or it is private or gated and "
            "no valid token was given). Fix: check the path or id; for a private repository pass token=... or log in "
            "with `hf auth login`."
        ) from None
    except LocalEntryNotFoundError as error:
        reason = str(error).splitlines()[0]
        raise AdapterFormatError(
            f"{where}: no local directory of that name, and no snapshot in the hub cache while the hub cannot be "
            f"used ({reason}). Fix: fetch it once with network access (HF_HUB_OFFLINE unset), or pass a local "
            "directory."
        ) from None
    except HfHubHTTPError as error:
        raise AdapterFormatError(f"{where}: the hub answered with an error ({error}). Fix: retry later.") from None
    directory = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not directory.resolve().is_relative_to(Path(snapshot).resolve()):  # a link in the snapshot that leaves it
        raise AdapterFormatError(f"{where}: the subfolder leads outside the repository's snapshot. Fix: pass a "
                                 "subfolder of the repository.")
    return directory


def check_subfolder(subfolder: object) -> str | None:
    """`subfolder` as a relative path that stays inside the folder or repository it names part of, or None.

    Raises:
        AdapterFormatError: not a string, absolute, or with a '..' part (it would leave the adapter's directory or
            the repository's snapshot).
    """
    if subfolder is None or subfolder == "":
        return None
    parts = Path(subfolder).parts if isinstance(subfolder, str) else None
    if parts is None or Path(subfolder).is_absolute() or ".." in parts or "\\" in subfolder:
        raise AdapterFormatError(
            f"subfolder={subfolder!r}: expected a relative path inside the adapter directory or repository (no "
            "leading '/', no '..'). Fix: e.g. subfolder='quotes', the adapter's folder in it."
        )
    return "/".join(part for part in parts if part != ".") or None


def check_revision(revision: object) -> None:
    """Refuses a `revision` that is not a branch, tag or commit name (a path could leave the hub cache's refs).

    Raises:
        AdapterFormatError: not a string, or with a '..' part, a leading '/', a backslash or a control character.
    """
    if revision is None:
        return
    if (not isinstance(revision, str) or not revision or revision.startswith("/") or ".." in revision.split("/")
            or "\\" in revision or any(ord(char) < 32 for char in revision)):
        raise AdapterFormatError(
            f"revision={revision!r}: expected a branch, tag or commit of the repository. Fix: e.g. revision='main' "
            "or a commit hash."
        )


def _cached(name: str, subfolder: str | None, options: HubOptions) -> bool:
    """Whether huggingface_hub's cache holds an adapter config for the hub id `name`."""
    if not is_repository_id(name):
        return False
    found = try_to_load_from_cache(name, f"{subfolder}/{CONFIG_FILE}" if subfolder else CONFIG_FILE,
                                   cache_dir=options.cache_dir, revision=options.revision)
    return isinstance(found, str)


def _holds_adapters(directory: Path) -> bool:
    """Whether `directory` holds adapters in subfolders (PEFT's layout for adapters not named 'default')."""
    try:
        return any((child / CONFIG_FILE).is_file() for child in directory.iterdir())
    except OSError:
        return False


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Commits every file of `folder` to the hub repository `repo_id`, creating the repository (and the branch
    `revision`) when missing.

    Returns:
        huggingface_hub's ``CommitInfo`` of the commit (its ``commit_url``, ``oid``, ``pr_url``).
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and not create_pr and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )


DEFAULT_ADAPTER = "default"
"""The adapter name PEFT saves at the top of a directory (every other adapter goes into a subfolder of its name)."""


def base_model_name(model: nn.Module) -> str | None:
    """The name the frozen base was loaded under (``config._name_or_path``), or None when it was built in memory."""
    return getattr(model.base_model.config, "_name_or_path", None) or None


def _is_hub_model(name: str | None) -> bool:
    """Whether `name` names a hub model rather than a local directory (only hub ids belong in the metadata)."""
    return bool(name) and not Path(name).is_dir() and is_repository_id(name)


def _load_arguments(adapter_name: str) -> str:
    """The extra arguments that load `adapter_name` from its place in the repository."""
    if adapter_name == DEFAULT_ADAPTER:
        return ""
    return f', subfolder="{adapter_name}", adapter_name="{adapter_name}"'


def model_card(model: nn.Module, adapter_names: list[str], format: str, repo_id: str) -> str:
    """The ``README.md`` text for a repository holding `adapter_names` of `model` in `format`.

    Args:
        model: the `SoftPromptModel` the adapters belong to.
        adapter_names: the adapters the repository holds (``default`` at the top, others in subfolders).
        format: ``"softprompt"`` or ``"peft"``, the format they are saved in.
        repo_id: the repository's id, for the loading examples.

    Returns:
        The card: YAML metadata between ``---`` lines, then Markdown.
    """
    base = base_model_name(model)
    methods = sorted({method_of(model.adapter_configs[name]).cli_name for name in adapter_names})
    on_hub = _is_hub_model(base)
    metadata = ModelCardData(
        base_model=base if on_hub else None,
        library_name="peft" if format == "peft" else "softprompt",
        pipeline_tag="text-generation",
        tags=["softprompt", *methods] + ([f"base_model:adapter:{base}"] if on_hub else []),
    )
    if on_hub:
        base_text = f"[{base}](https://huggingface.co/{base})"
    elif base:
        base_text = f"`{base}` (a local model)"
    else:
        base_text = "a base model whose name was not recorded"
    rows = []
    for name in adapter_names:
        spec = method_of(model.adapter_configs[name])
        parameters = sum(parameter.numel() for parameter in model.prompts[name].parameters())
        place = "the top folder" if name == DEFAULT_ADAPTER else f"`{name}/`"
        rows.append(
            f"| `{name}` | {spec.cli_name} | {getattr(model.adapter_configs[name], 'num_virtual_tokens', '-')} | "
            f"{parameters:,d} | {place} |"
        )
    first = adapter_names[0]
    loading = [
        "With softprompt (reads softprompt's format and PEFT's):",
        "",
        "```python",
        "from softprompt import AutoSoftPromptModelForCausalLM",
        f'model = AutoSoftPromptModelForCausalLM.from_pretrained("{repo_id}"{_load_arguments(first)})'
        + ("  # loads the base model too" if base else ""),
        "# or onto a base model already loaded:",
        "from softprompt import SoftPromptModel",
        f'model = SoftPromptModel.from_pretrained(base_model, "{repo_id}"{_load_arguments(first)})',
        "```",
        "",
    ]
    if format == "peft":
        loading += [
            "With PEFT:",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM, PeftModel",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}"{_load_arguments(first)})',
            f'model = PeftModel.from_pretrained(base_model, "{repo_id}"{_load_arguments(first)})',
            "```",
            "",
            "PEFT keeps the virtual tokens or prefix only (an encoder's output, not its weights).",
        ]
    else:
        loading += [
            "With PEFT: this repository is in softprompt's format, which keeps the encoders of p-tuning and "
            "projected prefix tuning so that training can resume. PEFT reads its own format; write that with "
            "softprompt first:",
            "",
            "```python",
            f'model = SoftPromptModel.from_pretrained(base_model, "{repo_id}"{_load_arguments(first)})',
            'model.save_pretrained("peft-adapter", format="peft")',
            "from peft import PeftModel",
            'model = PeftModel.from_pretrained(base_model, "peft-adapter")',
            "```",
        ]
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {repo_id}",
        "",
        f"Soft-prompt adapters ({', '.join(methods)}) for {base_text}, saved by softprompt {__version__} in "
        f"{'PEFT' if format == 'peft' else 'softprompt'}'s format. The base model stays frozen: these adapters are "
        "all that was trained.",
        "",
        "| adapter | method | virtual tokens | parameters | where |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        "## How to load it",
        "",
        *loading,
        "",
    ]
    return "\n".join(lines)
