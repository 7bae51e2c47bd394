"""The picture room: heatmaps of tables and plans (``heatmap``) and the validation figures (``validate``).
Functions return matplotlib Figures carrying the matrix they draw. May import: ``importance.table``,
``importance.store``, ``importance.errors``.
"""
