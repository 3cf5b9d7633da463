"""Minimal result containers with Detectron2's interface (``Instances``, ``Boxes``), so that code
written against Detectron2 outputs (``r["instances"].pred_masks`` …) works without it."""
from typing import Any, Dict, Tuple

import torch


class Boxes:
    """(N, 4) boxes as (x0, y0, x1, y1) in pixels."""

    def __init__(self, tensor: torch.Tensor):
        tensor = torch.as_tensor(tensor, dtype=torch.float32)
        if tensor.numel() == 0:
            tensor = tensor.reshape(0, 4)
        if tensor.dim() != 2 or tensor.shape[-1] != 4:
            raise ValueError(f"Boxes expects an (N, 4) tensor; got shape {tuple(tensor.shape)}")
        self.tensor = tensor

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, item) -> "Boxes":
        t = self.tensor[item]
        return Boxes(t.view(1, -1) if t.dim() == 1 else t)

    def to(self, *args, **kwargs) -> "Boxes":
        return Boxes(self.tensor.to(*args, **kwargs))

    def area(self) -> torch.Tensor:
        return (self.tensor[:, 2] - self.tensor[:, 0]) * (self.tensor[:, 3] - self.tensor[:, 1])

    @property
    def device(self):
        return self.tensor.device

    def __repr__(self) -> str:
        return f"Boxes({self.tensor})"


class Instances:
    """Per-image predictions: named fields that all have the same length, plus ``image_size``."""

    def __init__(self, image_size: Tuple[int, int], **fields: Any):
        self._image_size = (int(image_size[0]), int(image_size[1]))
        self._fields: Dict[str, Any] = {}
        for k, v in fields.items():
            self.set(k, v)

    @property
    def image_size(self) -> Tuple[int, int]:
        return self._image_size

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:
            self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("_fields", {})
        if name not in fields:
            raise AttributeError(f"Instances has no field {name!r}; fields: {sorted(fields)}")
        return fields[name]

    def set(self, name: str, value: Any) -> None:
        if self._fields and len(value) != len(self):
            raise ValueError(f"field {name!r} has length {len(value)}, other fields have {len(self)}")
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def get(self, name: str) -> Any:
        return self._fields[name]

    def remove(self, name: str) -> None:
        del self._fields[name]

    def get_fields(self) -> Dict[str, Any]:
        return self._fields

    def to(self, *args, **kwargs) -> "Instances":
        out = Instances(self._image_size)
        for k, v in self._fields.items():
            out.set(k, v.to(*args, **kwargs) if hasattr(v, "to") else v)
        return out

    def __getitem__(self, item) -> "Instances":
        if isinstance(item, int):
            item = slice(item, item + 1) if item != -1 else slice(item, None)
        out = Instances(self._image_size)
        for k, v in self._fields.items():
            out.set(k, v[item])
        return out

    def __len__(self) -> int:
        for v in self._fields.values():
            return len(v)
        return 0

    def __repr__(self) -> str:
        return (f"Instances(num_instances={len(self)}, image_height={self._image_size[0]}, "
                f"image_width={self._image_size[1]}, fields=[{', '.join(self._fields)}])")
