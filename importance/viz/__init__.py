"""The picture room: heatmaps of tables and plans (``heatmap``), the validation figures (``validate``), the
task-probe grid and causal matrix (``tasks``). Functions return matplotlib Figures carrying the matrix they draw.
May import: ``importance.table``, ``importance.scorers`` (names and the trusted head scorer), ``importance.store``,
``importance.errors``.
"""
