"""Studies: a whole paper table (or ablation) as one TOML file and one command.

`safe_cache.study.run(study, root)` extracts what is missing, fits what has no result and writes
the report (study.md, a self-contained study.html, study.json); every level resumes.
"""

from __future__ import annotations

from .plan import StudyPlan, plan_study
from .runner import StudyResult, run
from .spec import Study, list_studies, load_study

__all__ = ["Study", "StudyPlan", "StudyResult", "list_studies", "load_study", "plan_study", "run"]
