"""runnel backend built on CTranslate2: generator apps, tokenizers, chat templates and a built-in tiny model."""
