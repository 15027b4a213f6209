-- No severe length bias between chosen and rejected, per iteration and recipe (with at least
-- `min_pairs_for_bias` pairs): DPO readily learns "longer wins" (or "shorter wins") instead of
-- correctness. Fails when the mean word count of one side exceeds the other's by `max_length_ratio`,
-- or when one side is the longer one in more than `max_longer_share` of the pairs.
WITH lengths AS (
    SELECT iteration, recipe, len(words(chosen)) AS chosen_words, len(words(rejected)) AS rejected_words
    FROM pairs
),
stats AS (
    SELECT iteration, recipe, count(*) AS pairs,
           avg(chosen_words) AS mean_chosen_words, avg(rejected_words) AS mean_rejected_words,
           avg((chosen_words > rejected_words)::INTEGER) AS chosen_longer_share,
           avg((chosen_words < rejected_words)::INTEGER) AS rejected_longer_share
    FROM lengths GROUP BY iteration, recipe
)
SELECT 'iteration ' || iteration || ' ' || recipe AS pairs_of, pairs,
       round(mean_chosen_words, 1) AS mean_chosen_words, round(mean_rejected_words, 1) AS mean_rejected_words,
       round(chosen_longer_share, 3) AS chosen_longer_share, round(rejected_longer_share, 3) AS rejected_longer_share
FROM stats
WHERE pairs >= getvariable('min_pairs_for_bias')
  AND (greatest(mean_chosen_words, mean_rejected_words)
           > getvariable('max_length_ratio') * greatest(least(mean_chosen_words, mean_rejected_words), 1)
       OR greatest(chosen_longer_share, rejected_longer_share) > getvariable('max_longer_share'))
ORDER BY pairs_of
