"""Sizing a run before it starts: the model on the meta device (`model`), the analytic memory ledger
(`memory`) and the simulated rehearsal of one training step at any world size (`simulate`)."""
