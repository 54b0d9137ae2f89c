-- Seed 000: a task runs on `points` nodes at once (tasks.points, now changeable). Each run
-- records which point it is; a run stopped because points were lowered is 'stopped'.
ALTER TABLE runs ADD COLUMN point INTEGER NOT NULL DEFAULT 0;
