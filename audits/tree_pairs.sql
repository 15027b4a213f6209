-- MCTS-DPO's step pairs: both sides are children of one node on the path its search committed to, in
-- the pair's iteration; their steps are the pair's chosen and rejected text, chosen's Q is above
-- rejected's, and the prompt ends with the shared parent's last step.
SELECT p.pair_id, p.iteration, p.chosen_node_id, p.rejected_node_id,
       CASE WHEN c.node_id IS NULL OR r.node_id IS NULL THEN 'no such node'
            WHEN c.parent_node_id IS DISTINCT FROM r.parent_node_id THEN 'sides of different parents'
            WHEN parent.committed IS NOT TRUE THEN 'parent not on the committed path'
            WHEN c.step <> p.chosen OR r.step <> p.rejected THEN 'text differs from the nodes'' steps'
            WHEN NOT c.q > r.q THEN 'chosen''s Q is not above rejected''s'
            ELSE 'prompt does not end with the parent''s step' END AS problem
FROM pairs AS p
LEFT JOIN nodes AS c ON c.node_id = p.chosen_node_id AND c.iteration = p.iteration
LEFT JOIN nodes AS r ON r.node_id = p.rejected_node_id AND r.iteration = p.iteration
LEFT JOIN nodes AS parent ON parent.node_id = c.parent_node_id AND parent.iteration = p.iteration
WHERE (p.chosen_node_id IS NOT NULL OR p.rejected_node_id IS NOT NULL)
  AND (c.node_id IS NULL OR r.node_id IS NULL
       OR c.parent_node_id IS DISTINCT FROM r.parent_node_id
       OR parent.committed IS NOT TRUE
       OR c.step <> p.chosen OR r.step <> p.rejected
       OR NOT c.q > r.q
       OR NOT ends_with(p.prompt, parent.step))
ORDER BY p.iteration, p.pair_id
