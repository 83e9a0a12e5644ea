"""federated: vertical federated training (brand labels + partner features), see docs/vfl.md.

Public API (imported from the submodules, so `import federated` stays light):

- `federated.roles`: `TrainConfig`, `GuestRole`, `HostRole`, `ArbiterRole` (pure state machines),
  `split_indices`, `score_share`, `combine_score_shares`, `train_guest_only`, `fit_exact_lr`
  (the guest's own exact LR, the irls anchor),
  `guest_partial`, `host_partial`
- `federated.messages`: wire types, `encode` / `decode`
- `federated.paillier`: the Paillier recipes (`generate_keypair`, `ObfuscatorPool`, ...)
- `federated.executor`: the executor interface shared with PSI
- `federated.metrics.evaluate`, `federated.local.run_local`, `federated.inmemory.run_in_memory`
"""
