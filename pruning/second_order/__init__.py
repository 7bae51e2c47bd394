"""The second-order room: the calibration Hessian of each linear, damping and the blocked column loop
(``sparsegpt``) and the sequential block runner that feeds it (``sequential``). SparseGPT, GPTQ and structured
reconstruction all go through this one core. May import: ``importance``.
"""
