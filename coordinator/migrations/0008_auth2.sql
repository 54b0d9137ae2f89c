-- Which API key submitted each task (issue 6): a submitter sees and acts on only its own
-- tasks. NULL for tasks submitted without a key (auth off) and for older tasks.
ALTER TABLE tasks ADD COLUMN submitted_by INTEGER;
CREATE INDEX tasks_submitted_by ON tasks (submitted_by, task_id);
