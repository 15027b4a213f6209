-- No training problem may (nearly) repeat a test question: a problem this iteration samples or pairs,
-- or a gold training problem, is contaminated when at least `max_ngram_overlap` of a test question's
-- word `ngram`-grams appear in it (test splits: params eval.splits). Overlap compares word n-grams after
-- lower-casing and dropping punctuation, so templated text alone (different numbers) stays below it.
WITH used AS (
    SELECT problem_id FROM samples
    UNION SELECT problem_id FROM pairs
    UNION SELECT problem_id FROM problems WHERE split = 'train'
),
grams AS (
    SELECT problem_id, split, list_distinct(ngrams(question, getvariable('ngram'))) AS g FROM problems
),
test AS (
    SELECT problem_id, split, unnest(g) AS gram, len(g) AS total
    FROM grams WHERE list_contains(getvariable('test_splits'), split)
),
train AS (
    SELECT problem_id, split, unnest(g) AS gram
    FROM grams SEMI JOIN used USING (problem_id)
    WHERE NOT list_contains(getvariable('test_splits'), split)
)
SELECT train.problem_id, any_value(train.split) AS split, test.problem_id AS test_problem_id,
       any_value(test.split) AS test_split, round(count(*) / any_value(test.total), 3) AS overlap
FROM test JOIN train USING (gram)
GROUP BY train.problem_id, test.problem_id
HAVING count(*) / any_value(test.total) >= getvariable('max_ngram_overlap')
ORDER BY overlap DESC, train.problem_id
