"""The client side of each stage: one driver per stage (``train``, ``predict``, ``vectorize``,
``evaluate``). Each validates its inputs, plans, runs its tasks (:mod:`geoseg.tasks`) on the
cluster (:mod:`geoseg.cluster`) and assembles the outputs.
"""
