"""The model code a saved folder carries, so that a Hub repo loads where ``scldm_hf`` is not installed.

transformers (``auto_map`` + ``trust_remote_code``) and diffusers (a component's ``<folder>/<module>.py``, a custom
pipeline ``<module>.py`` at the repo root) import such code as flat files that import each other only as siblings
(``from .layers import ...``: both libraries follow single-dot imports only). The package's modules import across
sub-packages (``from ..errors import ...``), so a module is shipped with every module it imports, each written as
``<module name>.py`` with its relative imports rewritten to siblings. The sources are the package's own files: there
is no second copy to keep in sync. Only the standard library is used here, because this module ships too.
"""

import re
import sys
from pathlib import Path

RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)(\.+)([\w.]+)(\s+import)", flags=re.MULTILINE)
RELATIVE_IMPORT_NAME = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)
PACKAGE_IMPORT = re.compile(r"^\s*(?:from|import)\s+scldm_hf\b", flags=re.MULTILINE)


def module_closure(module_file: str | Path) -> dict[str, str]:
    """``{file name: source}`` of `module_file` and every module it imports relatively, imports made siblings.

    Works on the package (``from ..data.vocab import`` -> ``vocab.py``) and on already flattened code alike.
    """
    shipped: dict[str, str] = {}
    origin: dict[str, Path] = {}
    pending = [Path(module_file).resolve()]
    origin[pending[0].name] = pending[0]
    while pending:
        path = pending.pop()
        source = path.read_text(encoding="utf-8")
        if PACKAGE_IMPORT.search(source):
            raise ValueError(f"{path} imports scldm_hf absolutely; import package modules relatively so it can ship.")
        for match in RELATIVE_IMPORT.finditer(source):
            dots, name = match.group(2), match.group(3)
            imported = path.parents[len(dots) - 1].joinpath(*name.split(".")).with_suffix(".py").resolve()
            if imported.name not in origin:
                pending.append(imported)
                origin[imported.name] = imported
            elif origin[imported.name] != imported:
                raise ValueError(f"{imported} and {origin[imported.name]} would both ship as {imported.name}.")
        shipped[path.name] = RELATIVE_IMPORT.sub(lambda m: f"{m[1]}.{m[3].rsplit('.', 1)[-1]}{m[4]}", source)
    return shipped


def write_class_code(cls: type, folder: str | Path) -> str:
    """Write the :func:`module_closure` of the module defining `cls` into `folder` -> ``"<module>.<class name>"``,
    the reference ``auto_map`` (transformers) and ``model_index.json`` (diffusers) use for shipped code.

    diffusers copies only the modules that a local custom-code file imports itself, not what those import in turn
    (``get_cached_module_file`` in diffusers/utils/dynamic_modules_utils.py), so the entry module also gets an
    import of each module of its closure that it does not import directly.
    """
    module_file = Path(sys.modules[cls.__module__].__file__)
    shipped = module_closure(module_file)
    entry = module_file.name
    imported = {f"{name}.py" for name in RELATIVE_IMPORT_NAME.findall(shipped[entry])}
    indirect = sorted(set(shipped) - imported - {entry})
    if indirect:
        shipped[entry] += "\n\n# Added by scldm_hf.hub_code for diffusers, which copies only directly imported modules.\n"
        shipped[entry] += "".join(f"from .{Path(name).stem} import __name__ as _{Path(name).stem}  # noqa: E402\n"
                                  for name in indirect)
    for name, source in shipped.items():
        (Path(folder) / name).write_text(source, encoding="utf-8")
    return f"{module_file.stem}.{cls.__name__}"
