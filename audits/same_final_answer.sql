-- Gold recipes (dpo_st, dpo, scpo_semi where the problem has a gold answer): chosen and rejected must
-- reach different final answers, or the pair teaches nothing about correctness. Answers compare by their
-- canonical form (equivalent answers of a problem share it: \frac{1}{2} = 0.5; labels older than that column
-- compare by `answer`). A gold rationale on the chosen side (chosen_sample_id null) carries the gold answer,
-- so then the rejected side must be wrong.
SELECT p.pair_id, p.iteration, p.recipe, p.problem_id, p.chosen_sample_id, p.rejected_sample_id,
       coalesce(c.answer_canonical, c.answer, pr.gold_answer) AS chosen_answer,
       coalesce(r.answer_canonical, r.answer) AS rejected_answer
FROM pairs AS p
JOIN problems AS pr USING (problem_id)
JOIN labels AS r ON r.sample_id = p.rejected_sample_id AND r.iteration = p.iteration
LEFT JOIN labels AS c ON c.sample_id = p.chosen_sample_id AND c.iteration = p.iteration
WHERE gold_recipe(p.recipe) AND pr.gold_answer IS NOT NULL
  AND CASE WHEN p.chosen_sample_id IS NULL THEN r.correct
           ELSE coalesce(c.answer_canonical, c.answer) = coalesce(r.answer_canonical, r.answer) END
ORDER BY p.iteration, p.pair_id
