"""The devices of a task's roles (rollout, teacher, trainer): what launch assigns
(`launch.gpus.assign_roles`) and every layer below reads."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("rollout", "teacher", "trainer")


@dataclass(frozen=True)
class RoleDevices:
    rollout: tuple[str, ...]
    teacher: tuple[str, ...]
    trainer: tuple[str, ...]

    @property
    def on_cpu(self) -> bool:
        return not (self.rollout or self.teacher or self.trainer)

    def env(self, role: str) -> dict[str, str]:
        """Environment for a role's process: its own CUDA_VISIBLE_DEVICES."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(getattr(self, role))}
