"""``lr``: the learning rate of each param group at the step (after any scheduler has set it)."""

from .base import Quantity


class LearningRate(Quantity):
    name = "lr"
    description = "learning rate: lr = group 0, lr/group<i> for every group when there are several"
    reduces = False  # reads only what every process has (its own devices, the all-reduced .grad)

    def before_step(self, ctx):
        groups = ctx.watched.optimizer.param_groups
        for i, group in enumerate(groups):
            lr = group.get("lr")
            if lr is None:
                ctx.emit_nan(f"lr/group{i}" if len(groups) > 1 else "lr", "this optimizer's param group has no 'lr'")
                continue
            value = float(lr)  # also for a tensor lr
            if i == 0:
                ctx.emit("lr", value)
            if len(groups) > 1:
                ctx.emit(f"lr/group{i}", value)
