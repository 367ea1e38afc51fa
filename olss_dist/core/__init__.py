"""The maths of OLSS: pure numpy/torch, no Ray, no storage, no I/O beyond (de)serialising bytes.

Data flow: ``noise_schedule`` (the model's alphas) -> ``teacher`` (1000-step trajectories) -> ``tsqr``
(shard statistics: a float64 triangular R, merged as stacked R's) -> ``calibration`` (R + counts; fits
on R via ``lstsq``) -> ``path_search`` (minimax node search on R) -> ``plan`` (the K-step coefficients)
-> ``onpolicy`` (per-step refits on the sampler's own states); ``builtin`` converts diffusers' linear
solvers to the same plan form.
"""
