"""The stages, peers that hand each other artifacts (``ensemble_kd.storage.artifacts``) and never import
each other: ``teachers`` (train or import -> TeacherSet), ``embed`` (Ray tasks, a teacher's rows
split over its workers -> ShardIndex), ``select`` (DFND -> SelectionRecord), ``distill`` (Ray Train
-> StudentRun). The pipeline (``ensemble_kd.orchestration.pipeline``) composes them."""
