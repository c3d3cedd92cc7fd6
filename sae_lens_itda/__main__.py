from sae_lens_itda.cli import main

main()
