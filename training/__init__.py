"""Training, evaluation and calibration of the CLEWS model, and the version corpus it learns from.

    refrain corpus render --out data/corpus --works 200 --versions 6   # the corpus
    refrain train configs/default.yaml                                 # a model
    refrain evaluate --manifest data/corpus/manifest.csv --split test  # its retrieval metrics
    refrain calibrate runs/NAME --manifest ... --split valid           # its score calibration

The service never imports this package: inference lives in `refrain.model`, ranking in
`refrain.search`. Needs the `train` extra (music21, mido, librosa) for the corpus and the
training-free baselines.
"""
