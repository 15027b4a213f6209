-- SCDPO's step-controlled continuations (generator 'step_controlled'): each keeps its parent's first
-- `prefix_steps` steps word for word (the negative starts erring after them), its parent is a sample
-- labelled correct, and a continuation used as a pair's rejected side reaches a wrong final answer.
SELECT n.sample_id, n.iteration, n.parent_sample_id, n.prefix_steps, p.pair_id,
       CASE WHEN parent.sample_id IS NULL THEN 'no parent sample'
            WHEN len(steps(n.text)) < n.prefix_steps
              OR list_slice(steps(n.text), 1, n.prefix_steps) <> list_slice(steps(parent.text), 1, n.prefix_steps)
              THEN 'prefix differs from the parent''s first steps'
            WHEN pl.correct IS NOT TRUE THEN 'parent not labelled correct'
            ELSE 'rejected continuation not labelled wrong' END AS problem
FROM samples AS n
LEFT JOIN samples AS parent ON parent.sample_id = n.parent_sample_id AND parent.iteration = n.iteration
LEFT JOIN labels AS pl ON pl.sample_id = n.parent_sample_id AND pl.iteration = n.iteration
LEFT JOIN labels AS nl ON nl.sample_id = n.sample_id AND nl.iteration = n.iteration
LEFT JOIN pairs AS p ON p.rejected_sample_id = n.sample_id AND p.iteration = n.iteration
WHERE n.generator = 'step_controlled'
  AND (parent.sample_id IS NULL
       OR len(steps(n.text)) < n.prefix_steps
       OR list_slice(steps(n.text), 1, n.prefix_steps) <> list_slice(steps(parent.text), 1, n.prefix_steps)
       OR pl.correct IS NOT TRUE
       OR (p.pair_id IS NOT NULL AND nl.correct IS NOT FALSE))
ORDER BY n.iteration, n.sample_id
