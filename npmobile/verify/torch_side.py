"""The PyTorch side of verify: PyTorch's own run of a state dict (torchvision's module, or the user's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from npmobile.io.torch import torch_format
from npmobile.verify.report import CouldNotRun, UsageProblem
from npmobile.verify.sides import user_module


class TorchSide:
    """PyTorch's own run of a state dict: the module (torchvision's architecture, or the user's) with the file read
    by torch's loader and bound by ``load_state_dict(strict=True)``, compared by module path (``features.3``,
    ``features.4.block.2.fc1``, ``classifier``) through forward hooks. NCHW in and out, as PyTorch runs."""

    def __init__(self, torch, module, detail: str, probe: np.ndarray):
        self.torch = torch
        self.module = module
        self.label = "PyTorch"
        self.data_format = "channels_first"
        self.detail = detail
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self._order = self._finishing_order(probe)

    def _finishing_order(self, probe: np.ndarray) -> list[tuple[str, str]]:
        """(module path, class) in the order the modules finish their forward on ``probe``: graph order, a block
        after the layers inside it (named_modules() lists a block first). A module that never runs is left out."""
        modules = dict(self.module.named_modules())
        order: list[tuple[str, str]] = []
        seen: set[str] = set()

        def finished(name: str, module) -> None:
            if name not in seen:
                seen.add(name)
                order.append((name, type(module).__name__))

        hooks = [m.register_forward_hook(lambda m, i, o, name=name: finished(name, m))
                 for name, m in modules.items() if name]
        try:
            self.predict(probe)
        finally:
            for hook in hooks:
                hook.remove()
        return order

    def layers(self) -> list[tuple[str, str]]:
        return list(self._order)

    def predict_layers(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        modules = dict(self.module.named_modules())
        found: dict[str, np.ndarray] = {}

        def keep(name: str, output) -> None:
            # A copy now: an in-place activation after this module (torchvision's ReLU(inplace=True)) would change it.
            if isinstance(output, self.torch.Tensor):
                found.setdefault(name, output.detach().numpy().copy())

        hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: keep(name, o)) for name in names]
        try:
            self.predict(x)
        finally:
            for hook in hooks:
                hook.remove()
        return found

    def predict(self, x: np.ndarray) -> np.ndarray:
        try:
            with self.torch.inference_mode():
                output = self.module(self.torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        except Exception as error:  # the module's own forward (the user's code, with --torch-model) failed
            raise CouldNotRun(f"PyTorch's forward failed on an input of shape {tuple(x.shape)} "
                              f"({_one_line(error)})") from None
        if not isinstance(output, self.torch.Tensor):
            raise CouldNotRun(f"the PyTorch module returned a {type(output).__name__}, not one tensor of logits")
        return output.numpy()


def import_torch():
    """PyTorch, or why verify cannot check a state dict without it (one line, exit 3)."""
    try:
        import torch
    except Exception as error:  # ImportError, or a broken install failing as it starts
        raise CouldNotRun(f"checking a PyTorch state dict needs PyTorch, which is not importable in this Python "
                          f"({type(error).__name__}): pip install torch") from None
    return torch


def _one_line(error: Exception, limit: int = 300) -> str:
    """An exception from PyTorch (often several lines, with advice about weights_only) as one short line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


def _torch_state_dict(torch, path: str) -> tuple[dict, str]:
    """The file's state dict as PyTorch reads it (its own loaders, not npmobile's reader): ``torch.load`` with
    ``weights_only=True`` for a .pth, safetensors' own for a .safetensors; unwrapped from a training checkpoint and
    DataParallel's ``module.`` as npmobile's reader does."""
    from npmobile.io.torch import state_dict_of, without_module_prefix

    if torch_format(path) == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CouldNotRun(f"{path}: reading a .safetensors file in PyTorch needs the safetensors package: "
                              "pip install safetensors") from None
        how, load = "safetensors.torch.load_file", lambda: load_file(path)
    else:
        how, load = "torch.load(weights_only=True)", lambda: torch.load(path, map_location="cpu", weights_only=True)
    try:
        contents = load()
    except Exception as error:  # PyTorch's own failure on this file: report it, do not hide it as npmobile's
        raise CouldNotRun(f"PyTorch could not load {path} ({_one_line(error)})") from None
    state = state_dict_of(contents, path, torch.is_tensor)
    return {without_module_prefix(k): v for k, v in state.items() if torch.is_tensor(v)}, how


def open_torch(torch, path: str, model, user_module: str | None, probe: np.ndarray) -> TorchSide:
    """The reference module with the file's weights: torchvision's architecture as npmobile read it from the file
    (npmobile.applications.torchvision_modules), or the one the user's ``FILE.py:NAME`` builds."""
    if user_module is None:
        from npmobile.applications import torchvision_modules

        options = {"num_classes": model.num_classes, "width_mult": model.width_mult}
        if model.arch != "mobilenet_v2":
            options["reduced_tail"] = model.reduced_tail
        module = torchvision_modules.build(model.arch, **options)
        described = (f"torchvision's {model.arch}({', '.join(f'{k}={v}' for k, v in options.items())}) "
                     "(npmobile.applications.torchvision_modules)")
    else:
        module, described = _user_torch_module(torch, user_module)
    state, how = _torch_state_dict(torch, path)
    try:
        module.load_state_dict(state, strict=True)
    except Exception as error:  # a state dict that does not fit the module: PyTorch says which tensor
        raise CouldNotRun(f"PyTorch could not load {path} into {described} ({_one_line(error)})") from None
    module = module.float().eval()
    detail = f"PyTorch {torch.__version__}: {described}, the file read by {how}, load_state_dict(strict=True)"
    return TorchSide(torch, module, detail, probe)


def _user_torch_module(torch, spec: str):
    """``FILE.py:NAME``: the module NAME() returns, from the user's file (their code, run by verify only)."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name.isidentifier():
        raise UsageProblem(f"--torch-model {spec}: expected FILE.py:NAME (e.g. my_net.py:MobileNetV3)")
    if not Path(file).is_file():
        raise UsageProblem(f"{file}: no such file")
    factory = getattr(user_module(file, "npmobile_verify_user_torch_model"), name, None)
    if not callable(factory):
        raise CouldNotRun(f"{file} defines no class or function {name!r}")
    try:
        module = factory()
    except Exception as error:  # their code: any failure is theirs to see
        raise CouldNotRun(f"{file}: {name}() failed ({_one_line(error)})") from None
    if not isinstance(module, torch.nn.Module):
        raise CouldNotRun(f"{file}: {name}() returned a {type(module).__name__}, not a torch.nn.Module")
    return module, f"your {Path(file).name}:{name}() (your code, run only by verify)"

