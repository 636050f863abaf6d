"""
optimizers.py: several torch optimizers used as one (Muon for the blocks' matrices, AdamW for the rest, under
--optimizer muon). A companion of transformer.py, which imports it; it never imports transformer.py.
"""


class Optimizers:
    """Several torch optimizers stepped as one: what training uses of torch.optim.Optimizer, one state_dict."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # read anew each time: load_state_dict replaces each optimizer's groups
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {type(o).__name__: o.state_dict() for o in self.optimizers}

    def load_state_dict(self, state):
        for o in self.optimizers:
            o.load_state_dict(state[type(o).__name__])
