from sae_lens_itda.experiments.compare.cli import main

main()
