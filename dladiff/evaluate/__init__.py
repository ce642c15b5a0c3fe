"""Attack-side evaluation: the paper's metrics and the attacker pipeline behind `dladiff evaluate`."""
