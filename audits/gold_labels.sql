-- Gold recipes: the chosen side must be labelled correct and the rejected side not correct.
SELECT p.pair_id, p.iteration, p.recipe, p.problem_id,
       c.answer_status AS chosen_status, r.answer_status AS rejected_status
FROM pairs AS p
JOIN problems AS pr USING (problem_id)
LEFT JOIN labels AS c ON c.sample_id = p.chosen_sample_id AND c.iteration = p.iteration
LEFT JOIN labels AS r ON r.sample_id = p.rejected_sample_id AND r.iteration = p.iteration
WHERE gold_recipe(p.recipe) AND pr.gold_answer IS NOT NULL
  AND ((p.chosen_sample_id IS NOT NULL AND c.correct IS NOT TRUE) OR r.correct IS TRUE)
ORDER BY p.iteration, p.pair_id
