-- MCTS-DPO's search trees (`nodes`): a node's visits are its own evaluation (none for the question) plus
-- its children's visits, and its Q is the mean value over its subtree, so both follow from `value` alone;
-- a child's step sits under a parent of the same problem and iteration, one level deeper.
WITH children AS (
    SELECT parent_node_id AS node_id, iteration, sum(visits) AS child_visits,
           sum(coalesce(q, 0) * visits) AS child_value_sum
    FROM nodes WHERE parent_node_id IS NOT NULL
    GROUP BY ALL
)
SELECT n.node_id, n.iteration, n.problem_id, n.visits, n.q, n.value, c.child_visits, c.child_value_sum,
       CASE WHEN n.parent_node_id IS NOT NULL AND parent.node_id IS NULL THEN 'no such parent'
            WHEN parent.node_id IS NOT NULL AND (parent.problem_id <> n.problem_id OR parent.depth + 1 <> n.depth)
              THEN 'parent of another problem or depth'
            WHEN n.visits <> CAST(n.value IS NOT NULL AS INTEGER) + coalesce(c.child_visits, 0)
              THEN 'visits are not 1 (own value) + the children''s visits'
            ELSE 'Q is not the mean value over the subtree' END AS problem
FROM nodes AS n
LEFT JOIN children AS c USING (node_id, iteration)
LEFT JOIN nodes AS parent ON parent.node_id = n.parent_node_id AND parent.iteration = n.iteration
WHERE (n.parent_node_id IS NOT NULL AND parent.node_id IS NULL)
   OR (parent.node_id IS NOT NULL AND (parent.problem_id <> n.problem_id OR parent.depth + 1 <> n.depth))
   OR n.visits <> CAST(n.value IS NOT NULL AS INTEGER) + coalesce(c.child_visits, 0)
   OR abs(coalesce(n.q, 0) * n.visits - coalesce(n.value, 0) - coalesce(c.child_value_sum, 0)) > 1e-6
ORDER BY n.iteration, n.node_id
