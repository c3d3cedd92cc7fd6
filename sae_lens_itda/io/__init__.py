"""Files and the Hub: atomic writes, the cache folder, publishing and downloading dictionaries,
and the pretrained registry that makes ``SAE.from_pretrained`` find them."""
