# Reference fits with prior weights and offsets, for tests/test_weights_offsets.py.
# Regenerate with:  Rscript tests/reference/weights_offsets.R > tests/reference/lme4_weights_offsets.json
# (run from the repository root; lme4 and jsonlite from Debian's r-cran-* packages).
# The weights and offsets are deterministic functions of the row number, so that
# Python rebuilds the same columns: w = 0.5 + ((7 i) %% 13) / 8, o = ((5 i) %% 11) - 5.
suppressMessages({library(lme4); library(jsonlite)})
s <- read.csv("lmmjax/datasets/sleepstudy.csv")
i <- seq_len(nrow(s))
s$w <- 0.5 + ((7 * i) %% 13) / 8
s$o <- ((5 * i) %% 11) - 5
cases <- list(
  weights_reml = list(f = Reaction ~ Days + (Days | Subject), reml = TRUE, w = TRUE),
  weights_ml = list(f = Reaction ~ Days + (Days | Subject), reml = FALSE, w = TRUE),
  offset_reml = list(f = Reaction ~ Days + offset(o) + (Days | Subject), reml = TRUE, w = FALSE),
  both_ml = list(f = Reaction ~ Days + offset(o) + (1 | Subject), reml = FALSE, w = TRUE)
)
out <- lapply(cases, function(cs) {
  m <- if (cs$w) lmer(cs$f, s, weights = w, REML = cs$reml) else lmer(cs$f, s, REML = cs$reml)
  list(formula = paste(deparse(cs$f), collapse = ""), reml = cs$reml, weights = cs$w,
       objective = if (cs$reml) REMLcrit(m) else deviance(m), fixef = unname(fixef(m)),
       fixef_se = unname(sqrt(diag(as.matrix(vcov(m))))), sigma = sigma(m),
       theta = unname(getME(m, "theta")), fitted_head = unname(head(fitted(m), 5)))
})
cat(toJSON(list(lme4 = as.character(packageVersion("lme4")), cases = out), digits = NA,
           auto_unbox = TRUE, pretty = TRUE))
