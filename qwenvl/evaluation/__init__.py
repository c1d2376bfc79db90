"""Evaluation of a checkpoint: `command` runs `qwenvl eval` end to end, `answers` produces and scores greedy answers,
`scoring` holds the metrics and the trivial baselines, `report` writes report.json, the table and the PNGs."""
