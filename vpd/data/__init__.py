"""Question sources: synthetic shape scenes (:mod:`vpd.data.synth`) and imports of JSONL,
CSV and local Hugging Face datasets (:mod:`vpd.data.importer`)."""
