"""The algorithm, independent of SAELens and of where activations come from: pursuit (and its
compiled kernels), atom labels, the greedy construction, reconstruction metrics and the sink rule."""
