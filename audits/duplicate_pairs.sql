-- No pair twice in one iteration: the same prompt, chosen and rejected (or the same pair_id) would
-- weigh that preference double in training.
SELECT min(pair_id) AS pair_id, iteration, count(*) AS copies, list(DISTINCT pair_id ORDER BY pair_id) AS pair_ids
FROM pairs
GROUP BY iteration, prompt, chosen, rejected
HAVING count(*) > 1
UNION ALL
SELECT pair_id, iteration, count(*), [pair_id]
FROM pairs
GROUP BY iteration, pair_id
HAVING count(DISTINCT (prompt, chosen, rejected)) > 1
ORDER BY iteration, pair_id
